"""The notebooks' explorers in a real browser: JupyterLab from this environment, driven by headless
Chromium through selenium.

Each notebook (a copy at small parameters, ``interactive=True``, writing into a temporary run
folder) is Run All'd in the browser; then every explorer must have rendered as widgets — no
"Error displaying widget", no plain-text widget repr such as ``VBox(children=`` — with a figure in
its output, and changing each of its sliders and dropdowns must change that figure (the image's
``src`` before and after). With the widget extension disabled the same check must fail, so it
can. Screenshots and the page text of a failure are kept in a folder the failure message names.

Every notebook of the suite (00–05) is driven in the browser, about 9 minutes on two cores
(``MICROSCOPE_BROWSER_ONLY=01,02`` drives some, for a quicker local check); the disabled-extension
check runs a one-cell notebook with an explorer on a small table (no model: seconds). The
explorers' data logic is tested without a browser by ``test_widgets.py``.
Skipped, saying so, when Chromium or chromedriver is not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from microscope import suite

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="the browser tests need Chromium and chromedriver "
                       "(Debian: apt-get install -y chromium chromium-driver; .ci/run installs them)"),
]
#: what a widget view must never show: JupyterLab's message for a view it could not render, and the
#: text/plain repr a notebook falls back to when no widget renderer is there
NOT_RENDERED = ("Error displaying widget", "interactive(children=", "VBox(children=", "HBox(children=",
                "Output(outputs=")
#: the notebooks driven in the browser, in order (02 reads 01's store from the run folder): every
#: notebook of the suite, about 9 minutes on two cores; ``MICROSCOPE_BROWSER_ONLY=01,02`` picks some
#: (by number prefix) for a quicker local check
_ONLY = [x.strip() for x in os.environ.get("MICROSCOPE_BROWSER_ONLY", "").split(",") if x.strip()]
IN_BROWSER = [p.stem for p in suite.notebooks() if not _ONLY or any(p.stem.startswith(x) for x in _ONLY)]
#: the notebook run with the widget extension disabled: one explorer on a small knockout table
WITHOUT_WIDGETS = """import pandas as pd
from microscope.widgets import knockout_explorer

df = pd.DataFrame([{"sample_id": s, "category": "QueryAttr", "edge": "image↛last", "layer": l, "window": 1,
                    "p_base": 0.5, "p_blocked": 0.5 - 0.1 * l * (s == "b"), "change": -20.0 * l * (s == "b")}
                   for s in "ab" for l in range(3)])
knockout_explorer(df, lambda k: df, ["image↛last"], 1, 3).show(True);
"""
RUN_TIMEOUT = 240  # seconds for one notebook's Run All
WIDGET_PACKAGE = "@jupyter-widgets/jupyterlab-manager"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root: Path, widgets: bool = True) -> Iterator[str]:
    """JupyterLab on a free local port serving ``root``, with token auth; yields its base URL with
    the token. Its configuration lives in a fresh folder (none of the user's settings); with
    ``widgets=False`` that folder's ``labconfig/page_config.json`` disables the ipywidgets
    extension (what ``jupyter labextension disable`` writes)."""
    conf = Path(tempfile.mkdtemp(prefix="microscope-lab-config-"))
    if not widgets:
        (conf / "labconfig").mkdir()
        (conf / "labconfig" / "page_config.json").write_text(json.dumps({"disabledExtensions": {WIDGET_PACKAGE: True}}))
    # no toasts over the notebook: JupyterLab asks about its news feed on a fresh profile
    notes = conf / "settings" / "@jupyterlab" / "apputils-extension"
    notes.mkdir(parents=True)
    (notes / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))
    token, port = os.urandom(12).hex(), _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(conf), "JUPYTER_RUNTIME_DIR": str(conf / "runtime"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    log = open(root / f"lab-{port}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                             f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
                             "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
                             f"--LabApp.workspaces_dir={conf / 'workspaces'}",
                             f"--LabApp.user_settings_dir={conf / 'settings'}"]
                            + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() - t0 > 90:
                raise RuntimeError(f"JupyterLab did not start; its log: {log.name}")
            time.sleep(0.5)
        yield f"{base}/lab/tree/{{name}}?token={token}&reset"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(conf, ignore_errors=True)


@contextlib.contextmanager
def chromium() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1100"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def small_copy(name: str, root: Path, run_dir: Path) -> str:
    """A copy of notebook ``name`` in ``root`` whose parameters are overridden right after its
    parameters cell (as papermill injects them): small, interactive, writing under ``run_dir``."""
    import nbformat

    nb = nbformat.read(suite.NOTEBOOKS / f"{name}.ipynb", as_version=4)
    declared = suite.declared_parameters(suite.NOTEBOOKS / f"{name}.ipynb")
    params = {"small": True, "interactive": True, "out_dir": str(run_dir / name), "run_dir": str(run_dir),
              "figures_dir": str(run_dir / "figures")}
    src = "\n".join(f"{k} = {v!r}" for k, v in params.items() if k in declared)
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])) + 1
    nb.cells.insert(at, cell)
    nbformat.write(nb, root / f"{name}.ipynb")
    return f"{name}.ipynb"


def _wait(cond, timeout: float, what: str, step: float = 0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


_PROMPTS = "return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())"
_IDLE = ("const s = document.querySelector('.jp-Notebook-ExecutionIndicator');"
         "return s ? s.getAttribute('data-status') : null")


def _ran(prompt: str) -> bool:
    """``[12]:`` — the cell has an execution count (``[ ]:`` never ran, ``[*]:`` queued or running)."""
    return prompt[1:-2].strip().isdigit()


def _done(driver) -> bool:
    prompts = driver.execute_script(_PROMPTS)
    return bool(prompts) and all(map(_ran, prompts)) and driver.execute_script(_IDLE) == "idle"


def _accept_dialogs(driver) -> None:
    """Accept a dialog JupyterLab opened while the notebook loads (e.g. the kernel choice, when
    its kernel list arrives after the notebook); its text is printed."""
    from selenium.webdriver.common.by import By

    for dialog in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"):
        print(f"accepting a JupyterLab dialog: {dialog.text!r}")
        dialog.find_element(By.CSS_SELECTOR, ".jp-Dialog-footer .jp-mod-accept").click()
        time.sleep(1)


def run_all(driver, url: str) -> None:
    """Open the notebook at ``url``, wait for its kernel, Run All (the Run menu), wait until every
    code cell has an execution count and the kernel is idle."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(lambda: driver.execute_script(_IDLE) == "idle", 120, "the notebook's kernel to start")
    item = "//li[contains(@class,'lm-Menu-item')][.//div[text()='Run All Cells']]"

    def click_run_all() -> None:
        for attempt in range(3):  # a click while the page still settles can be lost: try again
            _accept_dialogs(driver)
            driver.find_element(By.XPATH, "//li[contains(@class,'lm-MenuBar-item')][.//div[text()='Run']]").click()
            _wait(lambda: driver.find_elements(By.XPATH, item), 10, "the Run menu")
            driver.find_element(By.XPATH, item).click()
            try:
                _wait(lambda: "[*]" in "".join(driver.execute_script(_PROMPTS)) or _done(driver), 15,
                      "Run All to start")
                return
            except AssertionError:
                if attempt == 2:
                    raise

    def stalled() -> bool:
        """The kernel idle with nothing queued, yet a code cell never ran (a Run All that reached
        only part of the notebook: seen once with a toast open over it)."""
        prompts = driver.execute_script(_PROMPTS)
        return driver.execute_script(_IDLE) == "idle" and "[*]" not in "".join(prompts) \
            and not all(map(_ran, prompts))

    click_run_all()
    t0, reruns, idle_since = time.time(), 0, None
    while not _done(driver):
        if time.time() - t0 > RUN_TIMEOUT:
            raise AssertionError(f"timed out after {RUN_TIMEOUT}s waiting for every cell to run "
                                 f"(prompts: {driver.execute_script(_PROMPTS)})")
        if stalled():
            idle_since = idle_since or time.time()
            if time.time() - idle_since > 10:  # idle for 10 s with cells left: Run All again
                if reruns == 2:
                    raise AssertionError(f"Run All stopped short three times (prompts: "
                                         f"{driver.execute_script(_PROMPTS)})")
                print(f"Run All stopped short (prompts {driver.execute_script(_PROMPTS)}): again")
                reruns, idle_since = reruns + 1, None
                click_run_all()
        else:
            idle_since = None
        time.sleep(0.5)


def widget_problems(driver) -> list[str]:
    """What is wrong with the widget views of the open notebook (empty: every view rendered): a
    cell's error, an unrendered widget (:data:`NOT_RENDERED`), or no explorer with a figure."""
    from selenium.webdriver.common.by import By

    problems = []
    for out in driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"):
        text = out.text
        problems += [f"an output shows {bad!r}: {text[:160]!r}" for bad in NOT_RENDERED if bad in text]
        if out.get_attribute("data-mime-type") == "application/vnd.jupyter.stderr" and "Traceback" in text:
            problems.append(f"a cell failed: {text[-300:]!r}")
    if not driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hslider, "
                                                 ".jp-OutputArea-output .widget-dropdown"):
        problems.append("no widget control (slider, dropdown) rendered")
    if not driver.find_elements(By.CSS_SELECTOR, ".widget-output img"):
        problems.append("no explorer drew a figure inside a widget output")
    return problems


def _figures(driver) -> str:
    return driver.execute_script(
        "return [...document.querySelectorAll('.widget-output img')].map(i => i.src).join('|')")


def change_each_control(driver, timeout: float = 120) -> list[str]:
    """Change every slider (one step, with the keyboard) and dropdown (to another option) of the
    explorers, one at a time; press the explorer's button after each where it has one. Returns
    what changed nothing: each change must change a figure's image."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    def settle(before):
        _wait(lambda: driver.execute_script(_IDLE) == "idle", timeout, "the kernel after a change")
        try:
            return _wait(lambda: (f := _figures(driver)) != before and "" not in f.split("|") and f, 20,
                         "the figure to change")
        except AssertionError:
            return None

    unchanged = []
    buttons = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-button")
    n_sliders = len(driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hslider"))
    n_drops = len(driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-dropdown select"))
    assert n_sliders + n_drops, "the explorers have no slider or dropdown"
    for kind, n in (("slider", n_sliders), ("dropdown", n_drops)):
        for i in range(n):
            before = _figures(driver)
            if kind == "slider":
                el = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-hslider")[i]
                label = el.text.split("\n")[0]
                handle = el.find_element(By.CSS_SELECTOR, ".noUi-handle")
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", handle)
                handle.click()
                at_max = handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax")
                handle.send_keys(Keys.ARROW_LEFT if at_max else Keys.ARROW_RIGHT)
            else:
                el = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output .widget-dropdown")[i]
                label = el.text.split("\n")[0]
                sel = Select(el.find_element(By.TAG_NAME, "select"))
                if len(sel.options) < 2:
                    continue
                current = sel.first_selected_option.get_attribute("value")
                sel.select_by_value(next(o.get_attribute("value") for o in sel.options
                                         if o.get_attribute("value") != current))
            for b in buttons:
                b.click()
            if settle(before) is None:
                unchanged.append(f"{kind} {label!r}")
    return unchanged


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A temporary root with small copies of the browser's notebooks and their run folder, and the
    one-cell notebook of the disabled-extension check."""
    import nbformat

    root = tmp_path_factory.mktemp("lab")
    for name in IN_BROWSER:
        small_copy(name, root, root / "run")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(WITHOUT_WIDGETS)], metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}})
    nbformat.write(nb, root / "explorer.ipynb")
    return root


_SHOTS: list[Path] = []


def _keep(driver, name: str) -> str:
    """A screenshot and the page text, in a folder kept after the tests (one per session)."""
    if not _SHOTS:
        _SHOTS.append(Path(tempfile.mkdtemp(prefix="microscope-browser-failures-")))
    shots = _SHOTS[0]
    driver.save_screenshot(str(shots / f"{name}.png"))
    (shots / f"{name}.txt").write_text(driver.find_element("tag name", "body").text)
    return f"screenshot and page text in {shots}"


def test_explorers_render_and_respond_in_jupyterlab(workspace):
    root = workspace
    with jupyterlab(root) as url, chromium() as driver:
        for name in IN_BROWSER:
            t0 = time.time()
            try:
                run_all(driver, url.format(name=f"{name}.ipynb"))
                problems = widget_problems(driver)
                assert not problems, f"{name}: " + "; ".join(problems)
                unchanged = change_each_control(driver)
                assert not unchanged, f"{name}: changing {', '.join(unchanged)} did not change the figure"
                assert not (p := widget_problems(driver)), f"{name} after the changes: " + "; ".join(p)
            except Exception as e:
                raise AssertionError(f"{e} ({_keep(driver, name)})") from e
            print(f"{name}: {time.time() - t0:.0f}s in the browser")


def test_the_check_fails_without_the_widget_extension(workspace):
    root = workspace
    with jupyterlab(root, widgets=False) as url, chromium() as driver:
        try:
            run_all(driver, url.format(name="explorer.ipynb"))
        except Exception as e:
            raise AssertionError(f"{e} ({_keep(driver, 'explorer-no-widgets')})") from e
        problems = widget_problems(driver)
        # no widget manager: no view is drawn, and the explorer's figure, its Output widget not
        # rendered, lands in the cell's own output area instead
        caught = "no widget control (slider, dropdown) rendered" in problems and \
            "no explorer drew a figure inside a widget output" in problems
        note = "" if caught else _keep(driver, "explorer-no-widgets")
    assert caught, f"without the widget extension the check reported {problems} ({note})"
