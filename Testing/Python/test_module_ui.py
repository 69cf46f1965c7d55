"""Consistency of the Slicer module without Qt: MedSegAI.py (parsed with ast), MedSegAI.ui (XML),
the parameter node, the CMake wiring, requirements.txt and the icon.

Qt, CTK and Slicer's GUI cannot run here, so these checks stand in for "the panel loads": every
widget the code uses exists with a class that supports that use, every SlicerParameterName is a
parameter-node field whose type Slicer's parameterNodeWrapper can bind to that widget class, and
the extension's CMake lists every engine file.
"""

from __future__ import annotations

import ast
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "MedSegAI"
MODULE_PY = MODULE_DIR / "MedSegAI.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedSegAI.ui"


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ui_widgets() -> dict[str, str]:
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for element in root.iter("widget"):
        name = element.get("name")
        assert name not in widgets, f"duplicate widget name {name} in MedSegAI.ui"
        widgets[name] = element.get("class")
    return widgets


@pytest.fixture(scope="module")
def ui_bindings() -> dict[str, str]:
    """SlicerParameterName -> widget class."""
    root = ET.parse(UI_FILE).getroot()
    bindings = {}
    for element in root.iter("widget"):
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property (stdset=0)"
                name = prop.findtext("string")
                assert name not in bindings, f"parameter {name} is bound to two widgets"
                bindings[name] = element.get("class")
    return bindings


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"MedSegAI.py has no class {name}")


def _constant(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"MedSegAI.py has no constant {name}")


def _parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> annotation source of MedSegAIParameterNode."""
    cls = _class(tree, "MedSegAIParameterNode")
    return {node.target.id: ast.unparse(node.annotation) for node in cls.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def _is_self_ui(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "ui" and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _ui_uses(tree: ast.Module) -> dict[str, set[str]]:
    """Widget name -> how the code uses it (attribute/method names and connected signals)."""
    channels = range(1, _constant(tree, "MAXIMUM_CHANNELS") + 1)
    uses: dict[str, set[str]] = {}
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

    def record(name: str, node: ast.AST) -> None:
        usage = uses.setdefault(name, set())
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute):
            usage.add(parent.attr)
            call = parents.get(parent)
            if parent.attr == "connect" and isinstance(call, ast.Call) and isinstance(call.args[0], ast.Constant):
                usage.add("signal:" + call.args[0].value)

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_self_ui(node.value):
            record(node.attr, node)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and _is_self_ui(node.args[0])):
            target = node.args[1]
            if isinstance(target, ast.Constant):
                record(target.value, node)
            else:
                assert isinstance(target, ast.JoinedStr), "getattr(self.ui, ...) needs a literal or f-string name"
                pattern = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in target.values)
                for number in channels:
                    record(pattern.format(number), node)
    return uses


# Which widget classes support a use of the widget in the code.
SIGNAL_CLASSES = {
    "clicked(bool)": {"QPushButton", "QToolButton", "QCheckBox"},
    "currentIndexChanged(int)": {"QComboBox"},
    "editingFinished()": {"QLineEdit", "QSpinBox", "QDoubleSpinBox"},
    "currentNodeChanged(vtkMRMLNode*)": {"qMRMLNodeComboBox"},
    "valueChanged(double)": {"ctkSliderWidget", "QDoubleSpinBox"},
    "toggled(bool)": {"QCheckBox", "QPushButton"},
}
METHOD_CLASSES = {
    "appendPlainText": {"QPlainTextEdit"},
    "addItem": {"QComboBox"},
    "findData": {"QComboBox"},
    "itemData": {"QComboBox"},
    "count": {"QComboBox"},
    "setCurrentIndex": {"QComboBox"},
    "value": {"QProgressBar", "QSpinBox", "QDoubleSpinBox", "ctkSliderWidget"},
    "setMRMLScene": {"qMRMLNodeComboBox"},
    "currentNode": {"qMRMLNodeComboBox"},
}
# Naming convention of the .ui: suffix -> classes.
SUFFIX_CLASSES = {
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "BrowseButton": {"QToolButton"},
    "Button": {"QPushButton"},
    "ComboBox": {"QComboBox"},
    "Selector": {"qMRMLNodeComboBox"},
    "Label": {"QLabel"},
    "LineEdit": {"QLineEdit"},
    "CheckBox": {"QCheckBox"},
    "SpinBox": {"QSpinBox", "QDoubleSpinBox"},
    "SliderWidget": {"ctkSliderWidget"},
    "TextEdit": {"QPlainTextEdit", "QTextEdit"},
    "progressBar": {"QProgressBar"},
}


def _suffix_classes(name: str) -> set[str] | None:
    for suffix, classes in SUFFIX_CLASSES.items():  # "BrowseButton" before "Button": dict order
        if name.endswith(suffix):
            return classes
    return None


def test_module_has_slicer_template_shape(tree: ast.Module) -> None:
    bases = {cls.name: [ast.unparse(b) for b in cls.bases] for cls in tree.body if isinstance(cls, ast.ClassDef)}
    assert bases["MedSegAI"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in bases["MedSegAIWidget"]
    assert bases["MedSegAILogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["MedSegAITest"] == ["ScriptedLoadableModuleTest"]
    decorators = [ast.unparse(d) for d in _class(tree, "MedSegAIParameterNode").decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    test_methods = [n.name for n in _class(tree, "MedSegAITest").body if isinstance(n, ast.FunctionDef)]
    assert "runTest" in test_methods and sum(name.startswith("test_") for name in test_methods) >= 3


def test_every_widget_used_exists_with_a_matching_class(tree: ast.Module, ui_widgets: dict[str, str]) -> None:
    uses = _ui_uses(tree)
    assert len(uses) > 20
    missing = sorted(set(uses) - set(ui_widgets))
    assert not missing, f"MedSegAI.py uses widgets that MedSegAI.ui lacks: {missing}"
    for name, usage in uses.items():
        cls = ui_widgets[name]
        for use in usage:
            allowed = SIGNAL_CLASSES.get(use[len("signal:"):]) if use.startswith("signal:") else METHOD_CLASSES.get(use)
            if use.startswith("signal:"):
                assert allowed is not None, f"unknown signal {use} used on {name}; add it to SIGNAL_CLASSES"
            if allowed is not None:
                assert cls in allowed, f"{name} is a {cls} but the code uses {use!r} (needs one of {sorted(allowed)})"


def test_widget_classes_follow_their_names(ui_widgets: dict[str, str]) -> None:
    for name, cls in ui_widgets.items():
        allowed = _suffix_classes(name)
        if allowed is not None:
            assert cls in allowed, f"{name} should be one of {sorted(allowed)}, is {cls}"


def _connector_accepts(widget_class: str, annotation: str) -> bool:
    """Mirror of slicer.parameterNodeWrapper.guiConnectors (which requires the exact widget class)."""
    base = annotation
    match = re.match(r"Annotated\[(.+?),", annotation)
    if match:
        base = match.group(1)
    if base.startswith("slicer.vtkMRML"):
        return widget_class == "qMRMLNodeComboBox"
    if base == "bool":
        return widget_class in ("QCheckBox", "QPushButton")
    if base == "int":
        return widget_class in ("QSpinBox", "QSlider")
    if base == "float":
        if widget_class == "ctkSliderWidget":
            return "WithinRange" in annotation
        return widget_class == "QDoubleSpinBox"
    if base == "str":
        if widget_class == "QComboBox":
            return "Choice" in annotation
        return widget_class in ("QLineEdit", "QTextEdit")
    return False


def test_parameter_names_are_fields_bindable_to_their_widgets(tree: ast.Module, ui_bindings: dict[str, str]) -> None:
    fields = _parameter_fields(tree)
    unknown = sorted(set(ui_bindings) - set(fields))
    assert not unknown, f"SlicerParameterName values that are not parameter node fields: {unknown}"
    for name, widget_class in ui_bindings.items():
        assert _connector_accepts(widget_class, fields[name]), f"{name}: {fields[name]} cannot bind to a {widget_class}"
    # Every field is on the panel; the model selector is filled from the installed models by code.
    assert set(fields) - set(ui_bindings) == {"modelId"}
    channels = _constant(tree, "MAXIMUM_CHANNELS")
    assert {f"inputVolume{n}" for n in range(1, channels + 1)} <= set(ui_bindings)


def test_node_selectors_get_the_scene_and_right_node_types(ui_widgets: dict[str, str], tree: ast.Module) -> None:
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {name for name, cls in ui_widgets.items() if cls == "qMRMLNodeComboBox"}
    assert selectors and selectors == receivers
    fields = _parameter_fields(tree)
    for element in root.iter("widget"):
        if element.get("class") != "qMRMLNodeComboBox":
            continue
        types = [s.text for p in element.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
        bound = [p.findtext("string") for p in element.findall("property") if p.get("name") == "SlicerParameterName"]
        assert bound, f"{element.get('name')} is not bound to the parameter node"
        assert fields[bound[0]] == f"slicer.{types[0]}"


def test_advanced_section_starts_collapsed() -> None:
    root = ET.parse(UI_FILE).getroot()
    advanced = next(w for w in root.iter("widget") if w.get("name") == "advancedCollapsibleButton")
    collapsed = [p.findtext("bool") for p in advanced.findall("property") if p.get("name") == "collapsed"]
    assert collapsed == ["true"]


def _with_try_display(node: ast.AST) -> bool:
    return isinstance(node, ast.With) and any("tryWithErrorDisplay" in ast.unparse(item.context_expr) for item in node.items)


def test_widget_calls_logic_only_inside_try_with_error_display(tree: ast.Module) -> None:
    widget = _class(tree, "MedSegAIWidget")
    methods = {n.name: n for n in widget.body if isinstance(n, ast.FunctionDef)}

    def calls(method: ast.FunctionDef, protected: bool, out: list[tuple[str, str, bool]]) -> None:
        def visit(node: ast.AST, inside: bool) -> None:
            inside = inside or _with_try_display(node)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Attribute):
                owner = node.func.value
                if isinstance(owner.value, ast.Name) and owner.value.id == "self" and owner.attr == "logic":
                    out.append(("logic", node.func.attr, inside))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "self" and node.func.attr in methods):
                out.append(("method", node.func.attr, inside))
            for child in ast.iter_child_nodes(node):
                visit(child, inside)

        for statement in method.body:
            visit(statement, protected)

    # A helper method counts as protected when every call to it is protected.
    protected = set()
    changed = True
    while changed:
        changed = False
        for name in methods:
            if name in protected:
                continue
            sites = []
            for other_name, other in methods.items():
                found: list[tuple[str, str, bool]] = []
                calls(other, other_name in protected, found)
                sites += [inside for kind, called, inside in found if kind == "method" and called == name]
            if sites and all(sites):
                protected.add(name)
                changed = True
    unprotected = []
    for name, method in methods.items():
        found: list[tuple[str, str, bool]] = []
        calls(method, name in protected, found)
        unprotected += [f"{name} -> logic.{called}" for kind, called, inside in found
                        if kind == "logic" and not inside and called != "getParameterNode"]
    assert not unprotected, f"Logic calls outside slicer.util.tryWithErrorDisplay: {unprotected}"


def test_cmake_lists_every_engine_file_and_resource() -> None:
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\s*(MedSegAILib/[A-Za-z0-9_/]+\.py)\s*$", cmake, re.MULTILINE))
    present = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "MedSegAILib").rglob("*.py")}
    assert present - listed == set(), f"missing from MedSegAI/CMakeLists.txt: {sorted(present - listed)}"
    assert listed - present == set(), f"listed but not present: {sorted(listed - present)}"
    for needle in ("${MODULE_NAME}.py", "Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui",
                   "Resources/requirements.txt", "Resources/Models/*", "MedSegAILib/model/schemas/*.json",
                   "slicerMacroBuildScriptedModule", "WITH_GENERIC_TESTS", "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)"):
        assert needle in cmake, f"MedSegAI/CMakeLists.txt lacks {needle}"
    assert re.search(r"set\(MODULE_NAME MedSegAI\)", cmake)
    for resource in ("Resources/Icons/MedSegAI.png", "Resources/UI/MedSegAI.ui", "Resources/requirements.txt"):
        assert (MODULE_DIR / resource).is_file()
    top = (MODULE_DIR.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in ('set(EXTENSION_CATEGORY "Segmentation")', 'set(EXTENSION_DEPENDS "NA")', "EXTENSION_HOMEPAGE",
                   "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                   "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(MedSegAI)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in top, f"CMakeLists.txt lacks {needle}"


def test_requirements_are_pinned_and_never_touch_slicer_packages() -> None:
    from MedSegAILib.slicer_bridge import dependencies
    from MedSegAILib.core.errors import MedSegAIInputError

    requirements = dependencies.read_requirements()
    assert set(requirements) == {"onnxruntime", "tensorflow", "tf2onnx", "onnx"}
    assert not dependencies.PROTECTED_PACKAGES & set(requirements)
    for name, line in requirements.items():
        assert re.search(r">=[0-9.]+,<[0-9.]+", line), f"{name} needs a pinned range, got {line!r}"
    assert dependencies.requirements_to_install(["onnxruntime"]) == [requirements["onnxruntime"]]
    for shipped in ("numpy", "scipy", "SimpleITK", "pydicom"):
        with pytest.raises(MedSegAIInputError, match="Slicer ships it"):
            dependencies.requirements_to_install([shipped])
    with pytest.raises(MedSegAIInputError, match="not listed"):
        dependencies.requirements_to_install(["left-pad"])


def test_missing_packages_reports_only_what_is_absent() -> None:
    from MedSegAILib.slicer_bridge import dependencies

    assert dependencies.missing_packages("segment", "onnx") == []  # the test environment has ONNX Runtime
    assert dependencies.missing_packages("segment", "tensorflow") == []
    assert dependencies.missing_packages("fine-tune") == []
    with pytest.raises(ValueError):
        dependencies.missing_packages("segment", "torch")
    with pytest.raises(ValueError):
        dependencies.missing_packages("train")


def test_needed_packages_follow_the_model_files(analytic_model_dir: Path) -> None:
    """auto: a model with model.onnx runs on ONNX Runtime or TensorFlow; a .keras-only model needs TensorFlow."""
    from MedSegAILib.slicer_bridge import dependencies
    from MedSegAILib.model.modelcard import ModelCard

    card = ModelCard.from_folder(analytic_model_dir)
    shipped = [(name,) for name in dependencies.SHIPPED_BY_SLICER]
    assert dependencies.needed_packages("segment", "auto", card) == [*shipped, ("onnxruntime", "tensorflow")]
    keras_only = type("Card", (), {"files": {"keras": "model.keras"}})()
    assert dependencies.needed_packages("segment", "auto", keras_only) == [*shipped, ("tensorflow",)]
    assert dependencies.needed_packages("segment", "onnx", keras_only) == [*shipped, ("onnxruntime",)]
    assert dependencies.needed_packages("fine-tune") == [*shipped, ("tensorflow",), ("tf2onnx",), ("onnx",), ("onnxruntime",)]


def test_icon_is_a_128_pixel_png() -> None:
    data = (MODULE_DIR / "Resources" / "Icons" / "MedSegAI.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_missing_packages_of_an_external_engine_python(tmp_path: Path) -> None:
    """A bare virtual environment (the user's own Python) lacks the engine packages; they are named."""
    import subprocess
    import sys

    from MedSegAILib.slicer_bridge import dependencies
    from MedSegAILib.core.errors import MedSegAIInputError

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=120)
    python = tmp_path / "env" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    missing = dependencies.missing_packages("segment", "onnx", str(python))
    assert missing == ["numpy", "scipy", "simpleitk", "pydicom", "onnxruntime"]
    with pytest.raises(MedSegAIInputError, match="numpy is missing"):
        dependencies.requirements_to_install(missing)
    assert dependencies.requirements_to_install(missing[-1:]) == [dependencies.read_requirements()["onnxruntime"]]
    assert dependencies.missing_packages("fine-tune", python_executable=str(python))[-4:] == ["tensorflow", "tf2onnx", "onnx", "onnxruntime"]


def test_extension_follows_slicers_current_template() -> None:
    """CMake policy range of the 5.10+ template (still building with 5.8's CMake), a screenshot that exists,
    and the Extensions Index entry that holds the category since 5.10."""
    import json

    top = (MODULE_DIR.parent / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"cmake_minimum_required\(VERSION 3\.16\.3\.\.\.3\.28\.0 FATAL_ERROR\)", top)
    for variable in ("EXTENSION_SCREENSHOTURLS", "EXTENSION_ICONURL"):
        url = re.search(rf'set\({variable} "([^"]+)"\)', top).group(1)
        relative = url.split("/main/", 1)[1]
        assert (MODULE_DIR.parent / relative).is_file(), f"{variable} names {relative}, which does not exist"
    entry = json.loads((MODULE_DIR.parent / "MedSegAI.json").read_text(encoding="utf-8"))
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema")
    assert entry["category"] == "Segmentation" and entry["scm_url"].endswith(".git")
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}


def _method(tree: ast.Module, name: str) -> ast.FunctionDef:
    widget = _class(tree, "MedSegAIWidget")
    return next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_panel_binds_with_a_tag_every_slicer_version_returns(tree: ast.Module, ui_bindings: dict[str, str]) -> None:
    """connectGui returns None before Slicer 5.10 (its connectors could never be disconnected and reset the
    combo boxes on every enter); connectParametersToGui returns a tag in 5.6-5.12."""
    source = ast.unparse(_class(tree, "MedSegAIWidget"))
    assert ".connectGui(" not in source
    assert "self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self.parameterWidgets())" in source
    assert "self._parameterNode.disconnectGui(self._parameterNodeGuiTag)" in source
    # Every line edit the user types into goes through the connector that never rewrites unchanged text.
    typed = {name for name, cls in ui_bindings.items() if cls == "QLineEdit"}
    assert typed == set(_constant(tree, "TYPED_TEXT_PARAMETERS"))
    connector = ast.unparse(_class(tree, "TypedTextConnector"))
    assert "if value != self._widget.text" in connector


def test_timer_tick_always_ends_with_buttons_and_timer_state(tree: ast.Module) -> None:
    """A finish that raises (tryWithErrorDisplay shows, then re-raises) must not skip the button update."""
    tick = _method(tree, "onPollTimer")
    handlers = [node for node in ast.walk(tick) if isinstance(node, ast.Try)]
    assert handlers and handlers[0].finalbody
    final = ast.unparse(ast.Module(body=handlers[0].finalbody, type_ignores=[]))
    assert "self._pollTimer.stop()" in final and "self.updateButtons()" in final


def test_closing_the_scene_cancels_quietly(tree: ast.Module) -> None:
    """Closing the scene mid-run cancels and forgets the run, so no 'Segmentation failed' pop-up follows."""
    source = ast.unparse(_method(tree, "onSceneStartClose"))
    assert "self._segmentationRun.cancel()" in source and "self._segmentationRun = None" in source
    finish = ast.unparse(_method(tree, "finishSegmentation"))
    assert finish.index("if run.cancelled:") < finish.index("tryWithErrorDisplay")


def test_model_selection_is_described_once(tree: ast.Module) -> None:
    """Selecting a model programmatically does not also fire currentIndexChanged (the card was validated twice)."""
    source = ast.unparse(_method(tree, "selectModelInComboBox"))
    assert source.index("blockSignals(True)") < source.index("setCurrentIndex(index)") < source.index("blockSignals(wasBlocked)")
    assert source.count("self.onModelChanged(index)") == 1


def test_setup_survives_errors_of_the_model_list(tree: ast.Module) -> None:
    """tryWithErrorDisplay re-raises: setup() must go on so the panel opens even if listing models fails."""
    source = ast.unparse(_method(tree, "populateModels"))
    assert source.index("try:") < source.index("tryWithErrorDisplay") and "except Exception" in source


def test_uncertainty_review_is_wired_through_the_logic(tree: ast.Module) -> None:
    """Show uncertainty asks the engine for the map; each finished Segment hands its result to the review
    (which starts the region list over); Next is off while segmenting; Rank cancels like Segment."""
    logic = _class(tree, "MedSegAILogic")
    methods = {n.name: ast.unparse(n) for n in logic.body if isinstance(n, ast.FunctionDef)}
    assert "uncertainty=parameterNode.showUncertainty" in methods["engineOptions"]
    finish = methods["finishSegmentation"]
    assert finish.index("run.finish(") < finish.index("self.uncertaintyReview.load_result(self.lastResult)")
    assert "next_region(start_over=True)" in methods["nextUncertainRegion"]
    buttons = ast.unparse(_method(tree, "updateButtons"))
    assert "self.ui.nextUncertainRegionButton.enabled = self._canVisitRegions and (not segmenting)" in buttons
    rank = ast.unparse(_method(tree, "onRankVolumesButton"))
    assert rank.index("self._rankRun.cancel()") < rank.index("tryWithErrorDisplay")
    close = ast.unparse(_method(tree, "onSceneStartClose"))
    assert "self._rankRun.cancel()" in close and "self._rankRun = None" in close
    tick = ast.unparse(_method(tree, "onPollTimer"))
    assert "(self._rankRun, 'rank')" in tick and "self._rankRun)" in tick
