"""MedSegAI: one-click AI segmentation in 3D Slicer.

Slicer's scripted-module shape: ``MedSegAI`` (module description), ``MedSegAIParameterNode``
(everything the panel shows, saved with the scene), ``MedSegAIWidget`` (GUI only),
``MedSegAILogic`` (a thin Slicer-facing layer over :mod:`MedSegAILib.slicer_bridge.slicer_logic`,
:mod:`MedSegAILib.slicer_bridge.dependencies` and :mod:`MedSegAILib.model.store`, which work on any MRML scene and
are what the pytest suites drive) and ``MedSegAITest`` (the in-Slicer self-test).

The engine never runs inside Slicer's process: Segment, Fine-tune and installing packages start a
separate process tree, a QTimer polls it without blocking, so Slicer stays responsive and Cancel
stops the whole tree within two seconds.
"""

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import Choice, GuiConnector, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin

from MedSegAILib.slicer_bridge import dependencies, mrml, slicer_logic, uncertainty_review
from MedSegAILib.model import store as model_store
from MedSegAILib.model.backends import BACKENDS, DEVICES
from MedSegAILib.core.errors import MedSegAIInputError

MAXIMUM_CHANNELS = 4
POLL_INTERVAL_MILLISECONDS = 200
POSTPROCESSING_CHOICES = ["model default", "on", "off"]
# Parameters whose line edit the user types into (paths): bound through TypedTextConnector, which
# never rewrites unchanged text (Slicer 5.6/5.8's own connector does, and the cursor jumps to the end).
TYPED_TEXT_PARAMETERS = ("enginePython", "datasetFolder")


#
# MedSegAI
#


class MedSegAI(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSegAI"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["MedSegAI contributors"]
        self.parent.helpText = """
Segment CT and MRI volumes with installed AI models in one click, correct the result in Segment
Editor, export corrected cases for training and fine-tune a model on them.
The engine runs in a separate process; Slicer stays usable and Cancel stops it at once.
"""
        self.parent.acknowledgementText = """
MedSegAI uses TensorFlow/Keras and ONNX Runtime. Shipped models list their training data and
licence in the NOTICE file of their model folder.
"""


#
# MedSegAIParameterNode
#


@parameterNodeWrapper
class MedSegAIParameterNode:
    """Everything the panel shows; saved with the scene.

    modelId - id or folder of the selected model (the folder when several versions exist).
    inputVolume1..inputVolume4 - one volume per model channel, in the model's channel order.
    outputSegmentation - segmentation to fill; None creates "<volume name> MedSegAI".
    device, backend, overlap, testTimeAugmentation, batchSize (0 = model default) - engine options.
    postprocessing - False gives the plain network output.
    largestComponent, fillHoles - "model default", "on" or "off".
    minimumIslandOverride - False keeps the model's island removal; True removes islands below
        minimumIslandVolumeMm3 (0 = none).
    enginePython - Python executable for the engine; empty = Slicer's Python.
    datasetFolder - training dataset folder for Export corrected labels and Fine-tune.
    showUncertainty - Segment also computes the uncertainty map, shown over the slice views.
    uncertaintyOpacity - opacity of that overlay.
    """

    modelId: str = ""
    inputVolume1: slicer.vtkMRMLScalarVolumeNode
    inputVolume2: slicer.vtkMRMLScalarVolumeNode
    inputVolume3: slicer.vtkMRMLScalarVolumeNode
    inputVolume4: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    backend: Annotated[str, Choice(list(BACKENDS))] = "auto"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    testTimeAugmentation: bool = False
    batchSize: Annotated[int, WithinRange(0, 512)] = 0
    postprocessing: bool = True
    largestComponent: Annotated[str, Choice(POSTPROCESSING_CHOICES)] = "model default"
    fillHoles: Annotated[str, Choice(POSTPROCESSING_CHOICES)] = "model default"
    minimumIslandOverride: bool = False
    minimumIslandVolumeMm3: Annotated[float, WithinRange(0.0, 1000000.0)] = 0.0
    enginePython: str = ""
    datasetFolder: str = ""
    showUncertainty: bool = False
    uncertaintyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


class TypedTextConnector(GuiConnector):
    """Binds a QLineEdit the user types into; writes the text only when it differs.

    Passed to ``connectParametersToGui`` as an instance (never registered for all line edits).
    """

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return False

    @staticmethod
    def create(widget, datatype):
        return None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.textChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.textChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> str:
        return self._widget.text

    def write(self, value: str) -> None:
        if value != self._widget.text:
            self._widget.text = value


#
# MedSegAIWidget
#


class MedSegAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. GUI only: every action calls MedSegAILogic inside tryWithErrorDisplay.

    ``tryWithErrorDisplay`` shows the error and raises it again; where the panel must go on after
    an error (setup, the poll timer) the error is caught after it was shown.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._uiWidget = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmentationRun = None
        self._fineTuneRun = None
        self._installRun = None
        self._rankRun = None
        self._canVisitRegions = False
        self._afterInstall = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        self._uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSegAI.ui"))
        self.layout.addWidget(self._uiWidget)
        self.ui = slicer.util.childWidgetVariables(self._uiWidget)
        self._uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedSegAILogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.editInSegmentEditorButton.connect("clicked(bool)", self.onEditInSegmentEditor)
        self.ui.caseReportButton.connect("clicked(bool)", self.onCaseReport)
        self.ui.enginePythonBrowseButton.connect("clicked(bool)", self.onBrowseEnginePython)
        self.ui.checkDependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self.ui.datasetFolderBrowseButton.connect("clicked(bool)", self.onBrowseDatasetFolder)
        self.ui.datasetFolderLineEdit.connect("editingFinished()", self.updateCaseCount)
        self.ui.exportCorrectedLabelsButton.connect("clicked(bool)", self.onExportCorrectedLabels)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTuneButton)
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", self.onUncertaintyDisplayChanged)
        self.ui.uncertaintyOpacitySliderWidget.connect("valueChanged(double)", self.onUncertaintyDisplayChanged)
        self.ui.nextUncertainRegionButton.connect("clicked(bool)", self.onNextUncertainRegion)
        self.ui.rankVolumesButton.connect("clicked(bool)", self.onRankVolumesButton)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MILLISECONDS)
        self._pollTimer.connect("timeout()", self.onPollTimer)

        self.populateModels()
        self.initializeParameterNode()
        self.showDependencyStatus()

    def cleanup(self) -> None:
        """Called when the application closes: stop running processes, drop observers."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        for run in (self._segmentationRun, self._fineTuneRun, self._installRun, self._rankRun):
            if run is not None and run.running:
                run.cancel()
                run.wait_stopped(2.0)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        """Closing the scene cancels a segmentation quietly (its nodes would be gone); fine-tuning goes on."""
        if self._segmentationRun is not None:
            self._segmentationRun.cancel()
            self._segmentationRun = None
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Segmentation cancelled: the scene was closed."
        if self._rankRun is not None:
            self._rankRun.cancel()
            self._rankRun = None
            self.ui.rankingLabel.text = "Ranking cancelled: the scene was closed."
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self._canVisitRegions = False  # the map node went with the scene
        self.ui.uncertainRegionLabel.text = "No uncertainty map yet: Segment with Show uncertainty checked."
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the scene's parameter node; pre-select the background volume as first input."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume1:
            try:
                with slicer.util.tryWithErrorDisplay("The background volume could not be selected."):
                    backgroundVolume = self.logic.backgroundVolumeNode()
                    if backgroundVolume:
                        self._parameterNode.inputVolume1 = backgroundVolume
            except Exception:
                logging.debug("MedSegAI: no background volume selected", exc_info=True)
        if not self._parameterNode.modelId and self.ui.modelComboBox.count > 0:
            self._parameterNode.modelId = self.ui.modelComboBox.itemData(0)
        self.selectModelInComboBox(self._parameterNode.modelId)
        if self._parameterNode.datasetFolder.strip():
            self.updateCaseCount()

    def parameterWidgets(self) -> dict:
        """Parameter name -> widget (or connector) for every widget with a SlicerParameterName."""
        mapping = {}
        for widget in self._uiWidget.findChildren(qt.QWidget):
            name = widget.property("SlicerParameterName")
            if name:
                mapping[name] = TypedTextConnector(widget) if name in TYPED_TEXT_PARAMETERS else widget
        return mapping

    def setParameterNode(self, inputParameterNode: Optional[MedSegAIParameterNode]) -> None:
        """Bind the panel to a parameter node.

        ``connectParametersToGui`` returns a tag in every Slicer version (``connectGui`` returns None
        before 5.10, so its connectors could never be disconnected and piled up on every enter).
        """
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self.parameterWidgets())
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    # -- model selection ---------------------------------------------------------------------

    def populateModels(self) -> None:
        """Fill the model selector with installed models ("name version"), folder as item data."""
        cards = []
        try:
            with slicer.util.tryWithErrorDisplay("The installed models could not be listed."):
                cards = self.logic.availableModels()
        except Exception:
            logging.debug("MedSegAI: model list failed", exc_info=True)
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for card in cards:
            self.ui.modelComboBox.addItem(f"{card.name} {card.version}", str(card.folder))
        self.ui.modelComboBox.blockSignals(wasBlocked)
        if self.ui.modelComboBox.count == 0:
            self.ui.modelDescriptionLabel.text = "No model is installed. Use Import model… to add one."

    def selectModelInComboBox(self, modelId: str) -> None:
        """Select a model without the combo box's own signal, then describe it once."""
        index = self.ui.modelComboBox.findData(modelId) if modelId else -1
        if index < 0 and self.ui.modelComboBox.count > 0:
            index = 0
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.setCurrentIndex(index)
        self.ui.modelComboBox.blockSignals(wasBlocked)
        self.onModelChanged(index)

    def onModelChanged(self, index: int) -> None:
        """Show the model's description and one input selector per channel, named after it."""
        if index < 0 or not self._parameterNode:
            return
        folder = self.ui.modelComboBox.itemData(index)
        if self._parameterNode.modelId != folder:
            self._parameterNode.modelId = folder
        card = None
        try:
            with slicer.util.tryWithErrorDisplay("The selected model cannot be used.", waitCursor=True):
                card = self.logic.modelCard(folder)
                self.ui.modelDescriptionLabel.text = self.logic.modelDescriptionHtml(card)
        except Exception:
            logging.debug("MedSegAI: model %s cannot be used", folder, exc_info=True)
        if card is None:
            return
        channelNames = card.channel_names
        for channelNumber in range(1, MAXIMUM_CHANNELS + 1):
            visible = channelNumber <= len(channelNames)
            label = getattr(self.ui, f"inputVolume{channelNumber}Label")
            selector = getattr(self.ui, f"inputVolume{channelNumber}Selector")
            label.visible = visible
            selector.visible = visible
            if visible:
                label.text = f"{channelNames[channelNumber - 1]}:"
                selector.toolTip = f"Volume for the model's {channelNames[channelNumber - 1]} channel."
        self.updateButtons()

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Import model: select the model.json of a model folder, or a .zip of one", "",
            "Model folder or archive (model.json *.zip)")
        if not path:
            return
        if Path(path).name == "model.json":
            path = str(Path(path).parent)
        with slicer.util.tryWithErrorDisplay("The model could not be imported.", waitCursor=True):
            card = self.logic.importModel(path)
            self.populateModels()
            self.selectModelInComboBox(str(card.folder))
            slicer.util.showStatusMessage(f"Imported model {card.name} {card.version}.", 5000)

    # -- buttons and the poll timer ----------------------------------------------------------

    def updateButtons(self, caller=None, event=None) -> None:
        """Enable buttons that can act now; Segment/Fine-tune read Cancel while their work runs."""
        if not self._parameterNode:
            return
        segmenting = self._segmentationRun is not None and self._segmentationRun.running
        fineTuning = self._fineTuneRun is not None and self._fineTuneRun.running
        installing = self._installRun is not None and self._installRun.running
        installingFor = self._afterInstall if installing else None
        ranking = self._rankRun is not None and self._rankRun.running
        hasInput = self._parameterNode.inputVolume1 is not None and bool(self._parameterNode.modelId)
        self.ui.segmentButton.text = "Cancel" if segmenting or installingFor == "segment" else "Segment"
        self.ui.segmentButton.enabled = (segmenting or installingFor == "segment"
                                         or (hasInput and not fineTuning and not installing))
        hasSegmentation = self._parameterNode.outputSegmentation is not None
        self.ui.editInSegmentEditorButton.enabled = hasSegmentation and not segmenting
        self.ui.caseReportButton.enabled = hasSegmentation and not segmenting
        hasFolder = bool(self._parameterNode.datasetFolder.strip())
        self.ui.exportCorrectedLabelsButton.enabled = hasSegmentation and hasFolder and not segmenting
        self.ui.fineTuneButton.text = "Cancel fine-tuning" if fineTuning or installingFor == "fine-tune" else "Fine-tune"
        self.ui.fineTuneButton.enabled = (fineTuning or installingFor == "fine-tune"
                                          or (hasFolder and bool(self._parameterNode.modelId)
                                              and not segmenting and not installing))
        self.ui.minimumIslandVolumeSpinBox.enabled = (self._parameterNode.postprocessing
                                                      and self._parameterNode.minimumIslandOverride)
        self.ui.checkDependenciesButton.enabled = not installing
        self.ui.uncertaintyOpacitySliderWidget.enabled = self._parameterNode.showUncertainty
        self.ui.nextUncertainRegionButton.enabled = self._canVisitRegions and not segmenting
        self.ui.rankVolumesButton.text = "Cancel ranking" if ranking else "Rank loaded volumes"
        self.ui.rankVolumesButton.enabled = ranking or (bool(self._parameterNode.modelId) and not segmenting
                                                        and not fineTuning and not installing)

    def onPollTimer(self) -> None:
        """Read the processes' progress (never blocks); finish those that ended.

        Whatever a finish raises (it was shown already), the tick ends with the buttons right and
        the timer stopped when nothing runs.
        """
        try:
            for run, kind in ((self._segmentationRun, "segment"), (self._fineTuneRun, "fine-tune"),
                              (self._installRun, "install"), (self._rankRun, "rank")):
                if run is None:
                    continue
                ended = not run.running
                for event in run.poll():
                    self.showProgress(event, kind)
                for line in run.read_log():
                    self.ui.logTextEdit.appendPlainText(line)
                if ended:
                    {"segment": self.finishSegmentation, "fine-tune": self.finishFineTune,
                     "install": self.finishInstall, "rank": self.finishRanking}[kind](run)
        except Exception:
            logging.debug("MedSegAI: a finished run raised", exc_info=True)
        finally:
            if not (self._segmentationRun or self._fineTuneRun or self._installRun or self._rankRun):
                self._pollTimer.stop()
            self.updateButtons()

    def showProgress(self, event, kind: str) -> None:
        eta = ""
        if event.eta_seconds is not None and event.fraction < 1.0:
            minutes, seconds = divmod(int(round(event.eta_seconds)), 60)
            eta = f", about {minutes}:{seconds:02d} left"
        detail = f" {event.message}" if event.message else ""
        text = f"{event.stage} {event.done}/{event.total}{eta}.{detail}"
        if kind == "segment":
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self.ui.statusLabel.text = text
        elif kind == "rank":
            self.ui.rankingLabel.text = f"Ranking: {text}"
        else:
            self.ui.fineTuneStatusLabel.text = f"Fine-tuning: {text}"

    # -- segmentation ------------------------------------------------------------------------

    def onSegmentButton(self) -> None:
        if self._segmentationRun is not None and self._segmentationRun.running:
            self._segmentationRun.cancel()
            self._segmentationRun = None
            self.ui.statusLabel.text = "Cancelled; the scene was not changed."
            self.ui.progressBar.value = 0
            self.updateButtons()
            return
        if self._afterInstall == "segment" and self._installRun is not None and self._installRun.running:
            self.cancelInstall()
            return
        with slicer.util.tryWithErrorDisplay("Segmentation could not be started.", waitCursor=True):
            replaced = self.logic.segmentsToBeReplaced(self._parameterNode)
            if replaced and not slicer.util.confirmOkCancelDisplay(
                    f"The output segmentation already has {', '.join(replaced)}; segmenting replaces them "
                    "(other segments are kept). Continue? To keep them, choose another output segmentation.",
                    "MedSegAI"):
                return
            if self.ensureDependencies("segment"):
                self.startSegmentation()
        self.updateButtons()

    def startSegmentation(self) -> None:
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting the engine…"
        with slicer.util.tryWithErrorDisplay("Segmentation could not be started.", waitCursor=True):
            self._segmentationRun = self.logic.startSegmentation(self._parameterNode)
            self._pollTimer.start()

    def finishSegmentation(self, run) -> None:
        self._segmentationRun = None
        if run.cancelled:
            return
        self.ui.statusLabel.text = "Segmentation failed; the scene was not changed."
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            result = self.logic.finishSegmentation(run)
            self._parameterNode.outputSegmentation = result.segmentation_node
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = (f"Done in {result.seconds:.0f} s: {len(result.segment_ids)} segment(s) from "
                                        f"{result.card.name} {result.card.version}.")
            self.logic.showResult(result)
            self.logic.showUncertainty(self._parameterNode)
            self.ui.uncertainRegionLabel.text = self.logic.uncertaintyCounterText()
            self._canVisitRegions = self.logic.hasUncertainRegions()

    def onEditInSegmentEditor(self) -> None:
        with slicer.util.tryWithErrorDisplay("Segment Editor could not be opened."):
            self.logic.openInSegmentEditor(self._parameterNode.outputSegmentation, self._parameterNode.inputVolume1)

    def onCaseReport(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save the case report", "case-report.pdf",
                                              "PDF (*.pdf)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("The case report could not be written.", waitCursor=True):
            written = self.logic.writeCaseReport(self._parameterNode, path)
            slicer.util.showStatusMessage(f"Wrote {written}.", 5000)

    # -- uncertainty review and case ranking ----------------------------------------------------

    def onUncertaintyDisplayChanged(self, value=None) -> None:
        """Show/hide the overlay or change its opacity (the parameter node is bound to both widgets)."""
        if not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay("The uncertainty overlay could not be shown."):
            self.logic.showUncertainty(self._parameterNode, self.ui.showUncertaintyCheckBox.checked,
                                       self.ui.uncertaintyOpacitySliderWidget.value)
            self.ui.uncertainRegionLabel.text = self.logic.uncertaintyCounterText()
            self._canVisitRegions = self.logic.hasUncertainRegions()
        self.updateButtons()

    def onNextUncertainRegion(self) -> None:
        with slicer.util.tryWithErrorDisplay("The next uncertain region could not be shown."):
            self.ui.uncertainRegionLabel.text = self.logic.nextUncertainRegion()

    def onRankVolumesButton(self) -> None:
        if self._rankRun is not None and self._rankRun.running:
            self._rankRun.cancel()
            self._rankRun = None
            self.ui.rankingLabel.text = "Ranking cancelled."
            self.updateButtons()
            return
        with slicer.util.tryWithErrorDisplay("The volumes could not be ranked.", waitCursor=True):
            self.ui.rankingLabel.text = "Starting the engine…"
            self._rankRun = self.logic.startRanking(self._parameterNode)
            self._pollTimer.start()
        self.updateButtons()

    def finishRanking(self, run) -> None:
        self._rankRun = None
        if run.cancelled:
            return
        self.ui.rankingLabel.text = "Ranking failed; see the log."
        with slicer.util.tryWithErrorDisplay("The volumes could not be ranked."):
            self.ui.rankingLabel.text = self.logic.finishRanking(run)

    # -- dependencies ------------------------------------------------------------------------

    def onBrowseEnginePython(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Python executable for the engine")
        if path:
            self._parameterNode.enginePython = path
            self.showDependencyStatus()

    def showDependencyStatus(self) -> None:
        """Say which packages Segment and Fine-tune still need (installed after the user agrees)."""
        if not self._parameterNode:
            return
        try:
            with slicer.util.tryWithErrorDisplay("Dependencies could not be checked."):
                segmentMissing = self.logic.missingPackages(self._parameterNode, "segment")
                fineTuneMissing = self.logic.missingPackages(self._parameterNode, "fine-tune")
                if segmentMissing:
                    self.ui.statusLabel.text = (f"Segment needs {', '.join(segmentMissing)}; "
                                                "it is offered for installation on the first Segment.")
                if fineTuneMissing:
                    self.ui.fineTuneStatusLabel.text = (f"Fine-tune needs {', '.join(fineTuneMissing)}; "
                                                        "it is offered for installation on the first Fine-tune.")
        except Exception:
            logging.debug("MedSegAI: dependency check failed", exc_info=True)

    def onCheckDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay("Dependencies could not be checked.", waitCursor=True):
            missing = self.logic.missingPackages(self._parameterNode, "segment")
            missing += [name for name in self.logic.missingPackages(self._parameterNode, "fine-tune") if name not in missing]
            if not missing:
                slicer.util.infoDisplay("The engine has every package Segment and Fine-tune need.")
                return
            if self.offerInstall(missing, None):
                self.ui.statusLabel.text = "Installing packages; see the log."

    def ensureDependencies(self, purpose: str) -> bool:
        """True when ``purpose`` can start now; otherwise offer the install (which continues it when done)."""
        missing = self.logic.missingPackages(self._parameterNode, purpose)
        if not missing:
            return True
        if self.offerInstall(missing, purpose):
            status = f"Installing {', '.join(missing)}; {purpose} starts when it is done (see the log)."
        else:
            status = f"Missing packages: {', '.join(missing)}; {purpose} not started."
        if purpose == "segment":
            self.ui.statusLabel.text = status
        else:
            self.ui.fineTuneStatusLabel.text = status
        return False

    def offerInstall(self, missing: list, purpose: Optional[str]) -> bool:
        """Ask, then start installing ``missing`` in the background; True when the install started."""
        lines = self.logic.requirementsToInstall(missing)
        enginePython = self._parameterNode.enginePython.strip()
        if enginePython:
            raise MedSegAIInputError(
                f"The engine Python lacks {', '.join(missing)}; install them into it with "
                f"`{enginePython} -m pip install {' '.join(repr(line) for line in lines)}`.")
        question = (f"MedSegAI needs these Python packages: {', '.join(lines)}.\n\n"
                    "Install them now into Slicer's Python? Packages Slicer already has are kept as they are; "
                    "this can take a few minutes and runs in the background.")
        if not slicer.util.confirmOkCancelDisplay(question, "MedSegAI dependencies"):
            return False
        self.ui.logTextEdit.clear()
        self._installRun = self.logic.startInstall(lines, self._parameterNode)
        self._afterInstall = purpose
        self._pollTimer.start()
        return True

    def cancelInstall(self) -> None:
        self._installRun.cancel()
        self._installRun = None
        self._afterInstall = None
        self.ui.statusLabel.text = "Installation cancelled."
        self.updateButtons()

    def finishInstall(self, run) -> None:
        self._installRun = None
        purpose, self._afterInstall = self._afterInstall, None
        if run.cancelled:
            return
        with slicer.util.tryWithErrorDisplay("The packages could not be installed.", waitCursor=True):
            self.logic.finishInstall(run, self._parameterNode, purpose)
            slicer.util.showStatusMessage(f"Installed {', '.join(run.lines)}.", 5000)
            self.ui.statusLabel.text = f"Installed {', '.join(run.lines)}."
            if purpose == "segment":
                self.startSegmentation()
            elif purpose == "fine-tune":
                self.startFineTune()

    # -- export and fine-tuning --------------------------------------------------------------

    def onBrowseDatasetFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Training dataset folder",
                                                     self._parameterNode.datasetFolder)
        if folder:
            self._parameterNode.datasetFolder = folder
            self.updateCaseCount()

    def updateCaseCount(self) -> None:
        with slicer.util.tryWithErrorDisplay("The dataset folder could not be read."):
            count = self.logic.datasetCaseCount(self._parameterNode.datasetFolder)
            self.ui.caseCountLabel.text = f"The dataset holds {count} case(s)."

    def onExportCorrectedLabels(self) -> None:
        with slicer.util.tryWithErrorDisplay("The case could not be exported.", waitCursor=True):
            caseId, changedVoxels = self.logic.exportCorrectedLabels(self._parameterNode)
            changed = f"; {changedVoxels} voxel(s) corrected" if changedVoxels is not None else ""
            slicer.util.showStatusMessage(f"Exported {caseId}{changed}.", 5000)
            self.updateCaseCount()

    def onFineTuneButton(self) -> None:
        if self._fineTuneRun is not None and self._fineTuneRun.running:
            self._fineTuneRun.cancel()
            self._fineTuneRun = None
            self.ui.fineTuneStatusLabel.text = "Fine-tuning cancelled; no model was added."
            self.updateButtons()
            return
        if self._afterInstall == "fine-tune" and self._installRun is not None and self._installRun.running:
            self.cancelInstall()
            return
        with slicer.util.tryWithErrorDisplay("Fine-tuning could not be started.", waitCursor=True):
            question = self.logic.fineTuneQuestion(self._parameterNode)
            if not slicer.util.confirmOkCancelDisplay(question, "MedSegAI fine-tuning"):
                return
            if self.ensureDependencies("fine-tune"):
                self.startFineTune()
        self.updateButtons()

    def startFineTune(self) -> None:
        with slicer.util.tryWithErrorDisplay("Fine-tuning could not be started.", waitCursor=True):
            self._fineTuneRun = self.logic.startFineTune(self._parameterNode)
            self.ui.fineTuneStatusLabel.text = "Fine-tuning started…"
            self._pollTimer.start()

    def finishFineTune(self, run) -> None:
        self._fineTuneRun = None
        if run.cancelled:
            return
        self.ui.fineTuneStatusLabel.text = "Fine-tuning failed; no model was added."
        with slicer.util.tryWithErrorDisplay("Fine-tuning failed.", waitCursor=True):
            card = self.logic.finishFineTune(run, self._parameterNode)
            self.populateModels()
            self.selectModelInComboBox(str(card.folder))
            self.ui.fineTuneStatusLabel.text = f"New model {card.name} {card.version} is installed and selected."


#
# MedSegAILogic
#


class MedSegAILogic(ScriptedLoadableModuleLogic):
    """Slicer-facing layer over MedSegAILib (slicer_logic, dependencies, model_store; any MRML scene).

    Errors a user can cause are MedSegAIInputError with one clear sentence; the widget shows them.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastResult = None
        self._cards = {}
        self.uncertaintyReview = uncertainty_review.UncertaintyReview()

    def getParameterNode(self) -> MedSegAIParameterNode:
        return MedSegAIParameterNode(super().getParameterNode())

    # -- models ------------------------------------------------------------------------------

    def availableModels(self) -> list:
        from MedSegAILib.model.modelcard import list_models

        cards = list_models()
        self._cards = {self._cardKey(str(card.folder)): card for card in cards}
        return cards

    @staticmethod
    def _cardKey(folder: str) -> tuple:
        cardFile = Path(folder) / "model.json"
        return (folder, cardFile.stat().st_mtime_ns if cardFile.is_file() else None)

    def modelCard(self, modelId: str):
        """The model's card, validated once per version of its model.json."""
        key = self._cardKey(modelId) if modelId and os.path.isdir(modelId) else (modelId, None)
        if key not in self._cards:
            self._cards[key] = slicer_logic.resolve_model(modelId)
        return self._cards[key]

    def modelDescriptionHtml(self, card) -> str:
        """Name, version, description, inputs and labels of a model, for the panel."""
        import html

        labels = ", ".join(html.escape(label.name) for label in card.labels)
        channels = ", ".join(html.escape(name) for name in card.channel_names)
        return (f"<b>{html.escape(card.name)}</b> {html.escape(card.version)}<br>{html.escape(card.description)}"
                f"<br><i>Inputs:</i> {channels}<br><i>Labels:</i> {labels}")

    def importModel(self, folderOrZip: str):
        return model_store.import_model(folderOrZip)

    # -- segmentation ------------------------------------------------------------------------

    def backgroundVolumeNode(self):
        """The volume shown in the red slice view's background, else the first scalar volume."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.sliceWidget("Red") is not None:
            compositeNode = layoutManager.sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
            node = slicer.mrmlScene.GetNodeByID(compositeNode.GetBackgroundVolumeID() or "")
            if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
                return node
        return slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def engineOptions(self, parameterNode: MedSegAIParameterNode) -> slicer_logic.EngineOptions:
        choice = {"model default": None, "on": True, "off": False}
        return slicer_logic.EngineOptions(
            device=parameterNode.device,
            backend=parameterNode.backend,
            overlap=parameterNode.overlap,
            tta=parameterNode.testTimeAugmentation,
            batch_size=parameterNode.batchSize or None,
            postprocessing=parameterNode.postprocessing,
            largest_component=choice[parameterNode.largestComponent],
            fill_holes=choice[parameterNode.fillHoles],
            min_island_mm3=parameterNode.minimumIslandVolumeMm3 if parameterNode.minimumIslandOverride else None,
            python_executable=parameterNode.enginePython.strip() or None,
            uncertainty=parameterNode.showUncertainty,
        )

    def inputVolumeNodes(self, parameterNode: MedSegAIParameterNode) -> list:
        return [getattr(parameterNode, f"inputVolume{number}") for number in range(1, MAXIMUM_CHANNELS + 1)]

    def startSegmentation(self, parameterNode: MedSegAIParameterNode) -> slicer_logic.SegmentationRun:
        """Validate and start the engine process; returns the run to poll."""
        card = self.modelCard(parameterNode.modelId)
        volumes = self.inputVolumeNodes(parameterNode)[: max(len(card.channels), 1)]
        extra = [node for node in self.inputVolumeNodes(parameterNode)[len(card.channels):] if node is not None]
        if extra:
            logging.info("MedSegAI: ignoring %d volume(s) selected beyond the model's channels", len(extra))
        run = slicer_logic.SegmentationRun(volumes, card, parameterNode.outputSegmentation,
                                           self.engineOptions(parameterNode), temp_root=slicer.app.temporaryPath)
        return run.start()

    def segmentsToBeReplaced(self, parameterNode: MedSegAIParameterNode) -> list:
        return slicer_logic.segments_to_be_replaced(parameterNode.outputSegmentation, parameterNode.modelId)

    def finishSegmentation(self, run: slicer_logic.SegmentationRun) -> slicer_logic.SceneResult:
        """Fill the scene; the run's uncertainty map replaces the last one and the region list starts over."""
        self.lastResult = run.finish(slicer.mrmlScene)
        self.uncertaintyReview.load_result(self.lastResult)
        return self.lastResult

    def segment(self, parameterNode: MedSegAIParameterNode, timeout: Optional[float] = None) -> slicer_logic.SceneResult:
        """Blocking segmentation (scripts and self-test)."""
        run = self.startSegmentation(parameterNode)
        try:
            run.wait(timeout=timeout)
        except BaseException:
            run.cancel()
            raise
        return self.finishSegmentation(run)

    def showResult(self, result: slicer_logic.SceneResult) -> None:
        """Show the segmentation over its input and the measurements table (in a layout that has a table view)."""
        displayNode = result.segmentation_node.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility(True)
        layoutManager = slicer.app.layoutManager()
        if result.table_node is None or layoutManager is None:
            return
        layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(result.table_node.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def sourceModel(self, parameterNode: MedSegAIParameterNode) -> str:
        """The folder of the model that made the output segmentation when it is still there, else the selected model."""
        segmentationNode = parameterNode.outputSegmentation
        source = json.loads(segmentationNode.GetAttribute(slicer_logic.SOURCE_MODEL_ATTRIBUTE) or "{}") if segmentationNode else {}
        folder = source.get("folder")
        return folder if folder and os.path.isdir(folder) else parameterNode.modelId

    def writeCaseReport(self, parameterNode: MedSegAIParameterNode, path: str):
        """The one-page PDF report of the output segmentation as it is now (no patient identifiers)."""
        # The file dialog already asked before replacing an existing file.
        return slicer_logic.write_case_report(path, parameterNode.outputSegmentation, self.inputVolumeNodes(parameterNode),
                                              self.sourceModel(parameterNode), overwrite=True)

    def openInSegmentEditor(self, segmentationNode, sourceVolumeNode) -> None:
        if segmentationNode is None:
            raise MedSegAIInputError("No segmentation is selected; run Segment first.")
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.SegmentEditorWidget.editor
        editor.setSegmentationNode(segmentationNode)
        if sourceVolumeNode is not None:
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(sourceVolumeNode)
            else:
                editor.setMasterVolumeNode(sourceVolumeNode)

    # -- uncertainty review and case ranking ----------------------------------------------------

    def showUncertainty(self, parameterNode: MedSegAIParameterNode, shown: Optional[bool] = None,
                        opacity: Optional[float] = None) -> None:
        """Overlay the last run's uncertainty map in the slice views, or take it away."""
        shown = parameterNode.showUncertainty if shown is None else shown
        opacity = parameterNode.uncertaintyOpacity if opacity is None else opacity
        self.uncertaintyReview.show(shown, opacity)

    def hasUncertainRegions(self) -> bool:
        return self.uncertaintyReview.has_map and bool(self.uncertaintyReview.regions)

    def uncertaintyCounterText(self) -> str:
        if not self.uncertaintyReview.has_map:
            return "No uncertainty map yet: Segment with Show uncertainty checked."
        return self.uncertaintyReview.counter_text()

    def nextUncertainRegion(self) -> str:
        """Go to the most uncertain region not visited yet (after the last, start over); returns the panel's line."""
        region = self.uncertaintyReview.next_region(start_over=True)
        if region is None:
            return self.uncertaintyCounterText()
        return self.uncertaintyReview.describe(region)

    def startRanking(self, parameterNode: MedSegAIParameterNode) -> uncertainty_review.RankRun:
        """Start ``medsegai rank`` on the scene's grey-value volumes with the selected model; returns the run to poll."""
        volumes = uncertainty_review.rankable_volume_nodes(slicer.mrmlScene)
        run = uncertainty_review.RankRun(volumes, self.modelCard(parameterNode.modelId), self.engineOptions(parameterNode),
                                         temp_root=slicer.app.temporaryPath)
        return run.start()

    def finishRanking(self, run: uncertainty_review.RankRun) -> str:
        """The ranked volumes as the panel lists them."""
        return uncertainty_review.ranking_text(run.finish())

    # -- dependencies ------------------------------------------------------------------------

    def missingPackages(self, parameterNode: MedSegAIParameterNode, purpose: str = "segment") -> list:
        """Packages ``purpose`` ("segment" or "fine-tune") needs that the engine's Python lacks."""
        card = None
        if purpose == "segment" and parameterNode.modelId:
            card = self.modelCard(parameterNode.modelId)
        return dependencies.missing_packages(purpose, parameterNode.backend, parameterNode.enginePython.strip() or None, card)

    def requirementsToInstall(self, missing: list) -> list:
        return dependencies.requirements_to_install(missing)

    def startInstall(self, lines: list, parameterNode: MedSegAIParameterNode) -> dependencies.PipInstallRun:
        """pip install ``lines`` into the engine's Python (after the user agreed), Slicer's packages kept."""
        return dependencies.PipInstallRun(lines, parameterNode.enginePython.strip() or None).start()

    def finishInstall(self, run: dependencies.PipInstallRun, parameterNode: MedSegAIParameterNode,
                      purpose: Optional[str]) -> None:
        """Check the install; raises when pip failed or what was needed still cannot be imported."""
        run.finish()
        for needed in (purpose,) if purpose else ("segment", "fine-tune"):
            stillMissing = self.missingPackages(parameterNode, needed)
            if stillMissing and needed == purpose:
                raise MedSegAIInputError(
                    f"pip finished but {', '.join(stillMissing)} still cannot be imported; see the log, or choose "
                    "an engine Python that has them under Advanced.")

    # -- export and fine-tuning --------------------------------------------------------------

    def datasetCaseCount(self, datasetFolder: str) -> int:
        return slicer_logic.dataset_case_count(datasetFolder.strip() or None)

    def exportCorrectedLabels(self, parameterNode: MedSegAIParameterNode) -> tuple:
        """Add the current case to the dataset folder; returns (case id, changed voxels or None)."""
        segmentationNode = parameterNode.outputSegmentation
        card = slicer_logic.resolve_model(self.sourceModel(parameterNode))
        volumes = self.inputVolumeNodes(parameterNode)[: len(card.channels)]
        original = None
        if self.lastResult is not None and self.lastResult.segmentation_node is segmentationNode:
            original = self.lastResult.labels
        datasetFolder = parameterNode.datasetFolder.strip()
        caseId = slicer_logic.export_for_training(slicer.mrmlScene, segmentationNode, volumes, datasetFolder, card, original)
        return caseId, slicer_logic.dataset_case_changed_voxels(datasetFolder, caseId)

    def fineTuneQuestion(self, parameterNode: MedSegAIParameterNode) -> str:
        """The confirmation shown before fine-tuning starts, with the plan and its time estimate."""
        plan = slicer_logic.fine_tune_plan(parameterNode.datasetFolder.strip(), parameterNode.modelId)
        minutes = max(1, round(plan.estimated_seconds / 60))
        return (f"Train a new version of the selected model on the dataset folder?\n\n{plan.describe()[:1].upper()}"
                f"{plan.describe()[1:]}.\n\nThis runs in the background (about {minutes} min); the current model "
                "stays installed and the new version is selected when it is done.")

    def startFineTune(self, parameterNode: MedSegAIParameterNode) -> slicer_logic.FineTuneRun:
        return slicer_logic.start_fine_tune(parameterNode.datasetFolder.strip(), parameterNode.modelId,
                                            python_executable=parameterNode.enginePython.strip() or None)

    def finishFineTune(self, run: slicer_logic.FineTuneRun, parameterNode: MedSegAIParameterNode):
        """Register the new version and select it; returns its card."""
        card = run.finish()
        self._cards.clear()
        parameterNode.modelId = str(card.folder)
        return card


#
# MedSegAITest
#


class MedSegAITest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the same Logic checks as the pytest suites, on the shipped sample CT."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_MedSegAI_segmentSampleData()
        self.setUp()
        self.test_MedSegAI_badInputLeavesSceneUnchanged()
        self.setUp()
        self.test_MedSegAI_exportCorrectedLabels()
        self.setUp()
        self.test_MedSegAI_settingsSurviveModuleSwitch()
        self.setUp()
        self.test_MedSegAI_uncertaintyReview()

    def _sampleVolume(self):
        samplePath = Path(__file__).parent / "Resources" / "SampleData" / "abdomen-ct.nii.gz"
        return slicer.util.loadVolume(str(samplePath))

    def _parameterNodeFor(self, volumeNode) -> MedSegAIParameterNode:
        logic = MedSegAILogic()
        parameterNode = logic.getParameterNode()
        cards = logic.availableModels()
        self.assertTrue(cards, "no model is installed")
        ctCards = [card for card in cards if len(card.channels) == 1]
        parameterNode.modelId = str((ctCards or cards)[0].folder)
        parameterNode.inputVolume1 = volumeNode
        parameterNode.device = "cpu"
        return parameterNode

    def test_MedSegAI_segmentSampleData(self) -> None:
        self.delayDisplay("Segmenting the sample CT")
        volumeNode = self._sampleVolume()
        logic = MedSegAILogic()
        parameterNode = self._parameterNodeFor(volumeNode)
        result = logic.segment(parameterNode, timeout=600)
        segmentation = result.segmentation_node
        self.assertEqual(segmentation.GetName(), f"{volumeNode.GetName()} MedSegAI")
        names = [segmentation.GetSegmentation().GetSegment(segmentId).GetName() for segmentId in result.segment_ids]
        self.assertEqual(names, [label.name for label in result.card.labels])
        reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
        self.assertIs(reference, volumeNode)
        exported = mrml.labels_from_segmentation_node(segmentation, volumeNode, result.card)
        self.assertTrue((exported.array == result.labels.array).all())
        self.assertTrue(exported.same_grid(mrml.volume_from_node(volumeNode)))
        self.delayDisplay("Segmentation test passed")

    def test_MedSegAI_badInputLeavesSceneUnchanged(self) -> None:
        self.delayDisplay("Checking bad input")
        volumeNode = self._sampleVolume()
        parameterNode = self._parameterNodeFor(volumeNode)
        logic = MedSegAILogic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        parameterNode.inputVolume1 = None
        with self.assertRaises(MedSegAIInputError):
            logic.startSegmentation(parameterNode)
        parameterNode.modelId = str(Path(tempfile.mkdtemp()))
        with self.assertRaises(MedSegAIInputError):
            logic.startSegmentation(parameterNode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.delayDisplay("Bad input test passed")

    def test_MedSegAI_exportCorrectedLabels(self) -> None:
        self.delayDisplay("Exporting a corrected case")
        volumeNode = self._sampleVolume()
        logic = MedSegAILogic()
        parameterNode = self._parameterNodeFor(volumeNode)
        result = logic.segment(parameterNode, timeout=600)
        parameterNode.outputSegmentation = result.segmentation_node
        parameterNode.datasetFolder = tempfile.mkdtemp(prefix="MedSegAITest-dataset-")
        firstCase, changed = logic.exportCorrectedLabels(parameterNode)
        self.assertEqual(changed, 0)
        secondCase, _ = logic.exportCorrectedLabels(parameterNode)
        self.assertNotEqual(firstCase, secondCase)
        self.assertEqual(logic.datasetCaseCount(parameterNode.datasetFolder), 2)
        self.delayDisplay("Export test passed")

    def test_MedSegAI_uncertaintyReview(self) -> None:
        """Segment with Show uncertainty: the map on the input's geometry, overlaid; Next counts; a new Segment starts over."""
        self.delayDisplay("Reviewing uncertain regions")
        volumeNode = self._sampleVolume()
        logic = MedSegAILogic()
        parameterNode = self._parameterNodeFor(volumeNode)
        parameterNode.showUncertainty = True
        result = logic.segment(parameterNode, timeout=600)
        self.assertIsNotNone(result.uncertainty)
        review = logic.uncertaintyReview
        mapMatrix, inputMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        review.volume_node.GetIJKToRASMatrix(mapMatrix)
        volumeNode.GetIJKToRASMatrix(inputMatrix)
        self.assertTrue(all(mapMatrix.GetElement(r, c) == inputMatrix.GetElement(r, c) for r in range(4) for c in range(4)))
        logic.showUncertainty(parameterNode, True, 0.4)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.sliceWidget("Red") is not None:
            compositeNode = layoutManager.sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
            self.assertEqual(compositeNode.GetForegroundVolumeID(), review.volume_node.GetID())
        self.assertTrue(review.regions, "the sample CT has no uncertain region")
        text = logic.nextUncertainRegion()
        self.assertTrue(text.startswith(f"region 1 of {len(review.regions)}"), text)
        self.assertEqual(review.visits.visited, {0})
        logic.segment(parameterNode, timeout=600)
        self.assertEqual(review.visits.visited, set())
        self.delayDisplay("Uncertainty review test passed")

    def test_MedSegAI_settingsSurviveModuleSwitch(self) -> None:
        """Leaving and re-entering the module keeps every setting (Slicer 5.6/5.8 reset combo boxes)."""
        self.delayDisplay("Switching modules")
        slicer.util.selectModule("MedSegAI")
        widget = slicer.modules.medsegai.widgetRepresentation().self()
        parameterNode = widget.logic.getParameterNode()
        parameterNode.device = "cpu"
        parameterNode.backend = "tensorflow"
        parameterNode.largestComponent = "off"
        parameterNode.fillHoles = "on"
        parameterNode.enginePython = "/opt/python/bin/python3"
        for _ in range(3):
            slicer.util.selectModule("Data")
            slicer.util.selectModule("MedSegAI")
        self.assertEqual((parameterNode.device, parameterNode.backend, parameterNode.largestComponent,
                          parameterNode.fillHoles, parameterNode.enginePython),
                         ("cpu", "tensorflow", "off", "on", "/opt/python/bin/python3"))
        self.assertEqual(widget.ui.deviceComboBox.currentText, "cpu")
        self.assertEqual(widget.ui.largestComponentComboBox.currentText, "off")
        self.assertEqual(widget.ui.enginePythonLineEdit.text, "/opt/python/bin/python3")
        parameterNode.enginePython = ""
        self.delayDisplay("Settings test passed")
