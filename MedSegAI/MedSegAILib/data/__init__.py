"""Training datasets: the dataset folder MedSegAI writes and the training package reads."""
