"""The course's panels in headless Chromium: Jupyter classic with ipywidgets 7.7.1 (Colab's), or Jupyter
Notebook 7 (JupyterLab 4) with ipywidgets 8 (a local learner's), chosen by ``--jupyter``.

Run by ``scripts/browser_test.sh`` (which makes the venv). Builds a notebook with the four panels on
the tiny model and a copy of the sample data, serves it on 127.0.0.1, runs every cell in the browser,
then acts as a learner, with the same checks in both frontends (only the page's own selectors differ,
in ``FRONTENDS``):

- the training panel renders, no label is cut, a new batch size changes the memory estimate and
  reaches ``cfg`` in the kernel;
- the sampler shows its picture at its own size, no label cut, and a new seed plus a click on Generate changes it;
- the step scrubber's readout is the label of the frame shown, and moving it changes the picture;
- the caption editor (notebook 02's) renders with no label cut; Next shows the next row's picture (its
  pixels, against the image file) and caption (as in metadata.csv); a caption typed and not saved is
  kept through Next and Previous and counted as unsaved, metadata.csv untouched; Save changes that
  row's line of metadata.csv and no other byte, and the caption is still there after moving away and
  back; the repository's data/sample is never written.

Exit status 0 when every check passes; screenshots, the notebook's stderr, the browser console
(``console.txt``) and a JSON summary (on a failure with what each cell shows) go to
``outputs/browser/<frontend>/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CELLS = [
    """import torch
from IPython.display import display
from sdcourse import models, runtime, sampling, tiny, widgets, visualization as viz
from sdcourse.train import TrainConfig
rt = runtime.setup(smoke=True, outputs=OUTPUTS)""",
    """cfg = TrainConfig(model="sd15", output_dir=str(rt.path("finetune")))
widgets.training_config_panel(cfg, config_path=rt.outputs / "finetune" / "config.json")""",
    """pipe = models.load_pipeline(tiny.sd_path("epsilon"), torch.float32)
pipe.set_progress_bar_config(disable=True)
display(widgets.sampler_panel(pipe, "a red circle on a white background", steps=3, height=64, width=64))""",
    """sampling.set_scheduler(pipe, "DDIM")
trace = sampling.trace_denoising(pipe, "a red circle on a white background", 0, steps=6, capture=[1, 2, 4, 6])
grid, frames = viz.denoising_pictures(pipe, trace)
display(widgets.step_scrubber(frames, [f"step {s} of 6" for s in trace.steps]))""",
    """print("cfg.batch_size is", cfg.batch_size)""",
    """import shutil
from sdcourse import sample_data
dataset_dir = shutil.copytree(sample_data.sample_dataset_dir(), DATASET)  # the repo's data/ stays as is
display(widgets.caption_editor(dataset_dir))""",
]

# What a cut label looks like to the browser: its text is wider than its box.
CUT_LABELS = """return Array.from(arguments[0].querySelectorAll('.widget-label, .widget-label-basic'))
  .filter(e => e.offsetParent !== null && e.textContent.trim())
  .map(e => [e.textContent.trim(), e.scrollWidth, e.clientWidth]);"""
# The pixels of an <img>, to tell a changed picture from a re-sent one.
PIXELS = """const img = arguments[0], c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL();"""
SIZE = "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height, arguments[0].naturalWidth, arguments[0].naturalHeight];"


# Jupyter classic's widget manager (ipywidgets 7's nbextension), once made, syncs with the kernel: it
# opens a 'jupyter.widget.control' comm and, when the kernel closes it (ipywidgets not imported yet),
# asks for the kernel's 'jupyter.widget' comms. Cells run before the kernel answered queue ahead of that
# request, and its answer, on the shell channel, can overtake the last widgets' comm_open on iopub: the
# manager then asks those widgets' state on comms of its own, and some or all of the page's widgets
# never render (measured: Run All the moment the manager exists failed 4 of 8, all or the last widgets missing;
# once its sync was answered, 6 of 6 passed). Installed before the page's own scripts, this counts the
# sync's messages the page sent and those the kernel answered.
WIDGET_SYNC = """window.sdcourseWidgetSync = {asked: 0, open: {}};
(function hook() {
  if (!(window.require && require.defined && require.defined('services/kernels/kernel'))) return setTimeout(hook, 1);
  const Kernel = require('services/kernels/kernel').Kernel, sync = window.sdcourseWidgetSync;
  const send = Kernel.prototype.send_shell_message, iopub = Kernel.prototype._handle_iopub_message;
  Kernel.prototype.send_shell_message = function (type, content, callbacks) {
    if (type === 'comm_open' && content.target_name === 'jupyter.widget.control') {
      sync.asked++; sync.open[content.comm_id] = true;  // answered by the comm's close or first message
    } else if (type === 'comm_info_request' && content.target_name === 'jupyter.widget' && callbacks) {
      const id = 'comm_info ' + sync.asked++, reply = callbacks.shell.reply;
      sync.open[id] = true;
      callbacks.shell.reply = function () { delete sync.open[id]; return reply.apply(this, arguments); };
    }
    return send.apply(this, arguments);
  };
  Kernel.prototype._handle_iopub_message = function (msg) {
    if (msg.header.msg_type === 'comm_close' || msg.header.msg_type === 'comm_msg') delete sync.open[msg.content.comm_id];
    return iopub.apply(this, arguments);
  };
})();"""

# What differs between the two frontends: how the server is started, how the page says the kernel is
# ready and the cells have run, how a learner runs them, and the class names of cells and outputs. The
# widgets' own classes (widget-vbox, widget-label, ...) are the same in ipywidgets 7 and 8.
CLASSIC_PROMPTS = """return Jupyter.notebook.get_cells().map(c => c.input_prompt_number === undefined ? ''
  : c.input_prompt_number === null ? '' : String(c.input_prompt_number));"""
# JupyterLab writes "[3]:", "[*]:" or "[ ]:" in each cell's prompt.
LAB_PROMPTS = """return Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell .jp-InputPrompt'))
  .map(e => e.textContent.replace(/[\\[\\]:\\s]/g, ''));"""
# JupyterLab shows an error as stderr: tell it by its traceback.
LAB_ERRORS = """return Array.from(document.querySelectorAll(
  '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
  .map(e => e.innerText).filter(t => t.includes('Traceback (most recent call last)'));"""
FRONTENDS = {
    "classic": {
        "server": lambda token, root: [f"--NotebookApp.token={token}", f"--notebook-dir={root}"],
        "kernel ready": "return !!(window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel"
                        " && Jupyter.notebook.kernel.is_connected())",
        # Not only the widget manager there: its first sync with the kernel answered (WIDGET_SYNC).
        "widgets ready": "const s = window.sdcourseWidgetSync; return !!(window.Jupyter && Jupyter.notebook"
                         " && Jupyter.notebook.kernel && Jupyter.notebook.kernel.widget_manager"
                         " && s && s.asked > 0 && !Object.keys(s.open).length)",
        "before load": WIDGET_SYNC,
        "prompts": CLASSIC_PROMPTS,
        "errors": "return Array.from(document.querySelectorAll('.output_error')).map(e => e.innerText);",
        "cells": "#notebook-container .cell",
        "stdout": ".output_text",
        "stderr": ".output_stderr",
    },
    "lab": {
        "server": lambda token, root: [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"],
        # The toolbar's kernel indicator: idle once the kernel has started and answered.
        "kernel ready": "const e = document.querySelector('.jp-Notebook-ExecutionIndicator');"
                        " return !!e && e.dataset.status === 'idle';",
        "prompts": LAB_PROMPTS,
        "errors": LAB_ERRORS,
        "cells": ".jp-Notebook .jp-Cell",
        "stdout": '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]',
        "stderr": '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
    },
}


def lab_settings(folder: Path) -> Path:
    """JupyterLab user settings for the test: no news or update toast over the cells (one asks on first
    start), and every cell kept in the page (JupyterLab 4 may leave cells out of view unrendered)."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                           "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, value in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(value))
    return folder


def run_all(driver, jupyter: str) -> int:
    """Run every cell as a learner does: Jupyter classic's own call, JupyterLab's Run menu; the number of
    kernel dialogs answered on the way."""
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By

    if jupyter == "classic":
        driver.execute_script("Jupyter.notebook.execute_all_cells()")
        return 0
    answered = 0
    # Clicked as soon as the page says idle, Run All may run only the first cell (the kernel still
    # connecting): then every other cell keeps an empty prompt, and the learner clicks again.
    for _ in range(5):
        # JupyterLab 4.6 may ask which kernel to start although the notebook names one and it has
        # started: the learner keeps the one offered (Python 3) and clicks Select.
        for button in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-button.jp-mod-accept"):
            button.click()
            answered += 1
            wait("the kernel after Select", lambda: not driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog")
                 and driver.execute_script(FRONTENDS[jupyter]["kernel ready"]), 120)
        try:
            driver.find_element(By.XPATH, "//li[contains(@class,'lm-MenuBar-item')][normalize-space()='Run']").click()
        except ElementClickInterceptedException:  # a dialog over the menu: answered above, then again
            continue
        wait("the Run menu", lambda: driver.find_elements(
            By.XPATH, "//li[contains(@class,'lm-Menu-item')][normalize-space()='Run All Cells']"), 10)[0].click()
        try:
            wait("every cell to be queued", lambda: all(driver.execute_script(FRONTENDS[jupyter]["prompts"])), 15)
            return answered
        except TimeoutError:
            pass
    raise TimeoutError("Run All Cells left cells unqueued, clicked 5 times")


def run_cell(driver, jupyter: str, cells, index: int) -> None:
    """Run one cell again: a click in it and Ctrl+Enter in JupyterLab."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if jupyter == "classic":
        driver.execute_script(f"Jupyter.notebook.execute_cells([{index}])")
        return
    cells[index].find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").click()
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()


def csv_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))[1:]


def csv_line(row: list[str], ending: str) -> bytes:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=ending).writerow(row)
    return buffer.getvalue().encode()


def pixel_gap(data_url: str, path: Path) -> int:
    """The largest difference, 0-255, between the picture a page shows and the image file, both RGB."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    shown = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")
    with Image.open(path) as img:
        wanted = img.convert("RGB")
    if shown.size != wanted.size:
        return 255
    return int(np.abs(np.asarray(shown, np.int16) - np.asarray(wanted, np.int16)).max())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(folder: Path, outputs: Path, dataset: Path) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"OUTPUTS = {str(outputs)!r}\nDATASET = {str(dataset)!r}\n" + CELLS[0])]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in CELLS[1:]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "panels.ipynb"
    nbformat.write(nb, path)
    return path


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    # Headless as root, and quiet: this machine's network is closed, and Chromium's background
    # connections would otherwise be refused many at a time.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1600", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait(what: str, condition, timeout: float = 300.0, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def page_state(driver, jupyter: str) -> dict[str, object]:
    """What the page shows when a check fails: each cell's text, the kinds of output each cell got,
    and whether the widget manager is there (the browser console goes to console.txt)."""
    from selenium.webdriver.common.by import By

    state: dict[str, object] = {}
    try:
        state["cells"] = [c.text[-400:] for c in driver.find_elements(By.CSS_SELECTOR, FRONTENDS[jupyter]["cells"])]
        if jupyter == "classic":
            state["outputs"] = driver.execute_script(
                "return Jupyter.notebook.get_cells().map(c => (c.output_area ? c.output_area.outputs : [])"
                ".map(o => o.output_type + ':' + Object.keys(o.data || {}).join(',')));")
        if "widgets ready" in FRONTENDS[jupyter]:
            state["widgets ready"] = driver.execute_script(FRONTENDS[jupyter]["widgets ready"])
    except Exception as error:  # the page may be gone; say so rather than hide the first failure
        state["error"] = f"{type(error).__name__}: {error}"[:300]
    return state


def shoot(element, path: Path) -> None:
    """A picture of one cell, scrolled to its top first: Chromium leaves out what is outside the window."""
    element.parent.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
    element.screenshot(str(path))


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("notebook", "jupyterlab", "ipywidgets", "jupyterlab_widgets", "widgetsnbextension"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jupyter", choices=sorted(FRONTENDS), default="classic",
                        help="classic: notebook 6.5 and ipywidgets 7.7.1 (Colab's); lab: Notebook 7 and ipywidgets 8")
    parser.add_argument("--out", type=Path, help="default: outputs/browser/<jupyter>")
    args = parser.parse_args()
    args.out = args.out or ROOT / "outputs" / "browser" / args.jupyter
    page = FRONTENDS[args.jupyter]
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sdcourse-browser-"))
    dataset = work / "dataset"
    notebook = write_notebook(work, work / "outputs", dataset)
    repo_sample = (ROOT / "data" / "sample" / "metadata.csv").read_bytes()
    port, token = free_port(), secrets.token_hex(16)
    # PYTHONPATH: the kernel imports this checkout's sdcourse, whichever checkout the venv was installed from.
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               JUPYTERLAB_SETTINGS_DIR=str(lab_settings(work / "lab-settings")))
    server = subprocess.Popen(
        [sys.executable, "-m", "notebook", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         *page["server"](token, work)],
        env=env, stdout=open(args.out / "server.log", "w"), stderr=subprocess.STDOUT)
    checks: dict[str, object] = {"jupyter": args.jupyter, "versions": versions()}
    driver = None
    try:
        wait("the notebook server", lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 60)
        driver = browser(work / "profile")
        if "before load" in page:
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": page["before load"]})
        driver.get(f"http://127.0.0.1:{port}/notebooks/{notebook.name}?token={token}")
        js = driver.execute_script
        loaded = time.time()
        wait("the kernel", lambda: js(page["kernel ready"]), 120)
        checks["kernel ready seconds"] = round(time.time() - loaded, 1)
        if "widgets ready" in page:
            wait("the widget manager's first sync with the kernel", lambda: js(page["widgets ready"]), 120, 0.1)
            checks["widgets ready seconds"] = round(time.time() - loaded, 1)
            checks["widget sync messages answered"] = js("return window.sdcourseWidgetSync.asked")
        started = time.time()
        checks["kernel dialogs answered"] = run_all(driver, args.jupyter)

        def finished():  # every cell ran, or one failed (the rest then never runs)
            prompts = js(page["prompts"])
            return (prompts and all(p.isdigit() for p in prompts)) or js(page["errors"])
        wait("Run All", finished, 600, 1.0)
        checks["run all seconds"] = round(time.time() - started, 1)
        cells = driver.find_elements(By.CSS_SELECTOR, page["cells"])
        errors = js(page["errors"])
        checks["stderr boxes"] = [e.text[:300] for e in driver.find_elements(By.CSS_SELECTOR, page["stderr"])]
        assert not errors, f"cells failed: {errors}"
        driver.save_screenshot(str(args.out / "after_run_all.png"))

        # 1. The training panel: renders, no label cut, a value changes the estimate and reaches cfg.
        panel = wait("the training panel", lambda: cells[1].find_elements(By.CSS_SELECTOR, ".widget-vbox"), 60)[0]
        labels = js(CUT_LABELS, panel)
        cut = {"training panel": [text for text, scroll, client in labels if scroll > client]}
        checks["training panel labels"] = len(labels)
        # The HTML widget's box, not its <pre>: a new value replaces what is inside.
        estimate = panel.find_element(By.XPATH, ".//div[contains(@class,'widget-html')][.//pre]")
        before = estimate.text
        box = panel.find_element(By.XPATH, ".//div[contains(@class,'widget-inline-hbox')]"
                                           "[.//label[normalize-space()='batch size']]//input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("8", Keys.TAB)
        wait("the estimate to change", lambda: estimate.text != before, 30)
        total = [line.strip() for line in estimate.text.splitlines() if line.strip().startswith("total")]
        checks["estimate before"] = [line.strip() for line in before.splitlines() if line.strip().startswith("total")]
        checks["estimate after batch 8"] = total
        shoot(cells[1], args.out / "training_panel.png")
        run_cell(driver, args.jupyter, cells, 4)
        output = wait("cfg's value", lambda: "".join(e.text for e in cells[4].find_elements(
            By.CSS_SELECTOR, page["stdout"])).strip().endswith(" 8") and cells[4].text, 60)
        checks["kernel sees"] = output.splitlines()[-1]

        # 2. The sampler: the picture at its own size; a new seed and a click change it.
        sampler = cells[2]
        labels = js(CUT_LABELS, sampler)
        checks["sampler labels"] = len(labels)
        cut["sampler"] = [text for text, scroll, client in labels if scroll > client]
        img = sampler.find_element(By.CSS_SELECTOR, ".widget-image")
        checks["sampler picture shown x natural"] = js(SIZE, img)
        first = js(PIXELS, img)
        seed = sampler.find_element(By.XPATH, ".//div[contains(@class,'widget-inline-hbox')][.//label[normalize-space()="
                                              "'Seed']]//input")
        seed.send_keys(Keys.CONTROL, "a")
        seed.send_keys("1", Keys.TAB)
        sampler.find_element(By.XPATH, ".//button[normalize-space()='Generate']").click()
        wait("a new picture", lambda: js(PIXELS, img) != first, 120)
        caption = sampler.find_element(By.XPATH, ".//button[normalize-space()='Generate']/following-sibling::*").text
        checks["sampler caption after click"] = caption
        shoot(sampler, args.out / "sampler.png")

        # 3. The scrubber: the readout is the frame's label; moving it changes the picture.
        scrubber = cells[3]
        labels = js(CUT_LABELS, scrubber)
        checks["scrubber labels"] = len(labels)
        cut["scrubber"] = [text for text, scroll, client in labels if scroll > client]
        img = scrubber.find_element(By.CSS_SELECTOR, ".widget-image")
        readout = scrubber.find_element(By.CSS_SELECTOR, ".widget-readout")
        checks["scrubber picture shown x natural"] = js(SIZE, img)
        seen = [(readout.text, js(PIXELS, img))]
        # A click on the track at each next frame's place, as with a mouse. (The arrow keys move the
        # slider in Jupyter classic but not in Notebook 7, where a real key press never reaches the handle.)
        track = scrubber.find_element(By.CSS_SELECTOR, ".ui-slider, .noUi-target")
        width = track.size["width"]
        for place in (1 / 3, 2 / 3, 1):
            ActionChains(driver).move_to_element_with_offset(track, round((place - 0.5) * width) - (place == 1), 0
                                                             ).click().perform()
            wait("the next frame", lambda: js(PIXELS, img) != seen[-1][1] and readout.text != seen[-1][0], 30)
            seen.append((readout.text, js(PIXELS, img)))
        checks["scrubber readouts"] = [text for text, _ in seen]
        shoot(scrubber, args.out / "scrubber.png")

        # 4. The caption editor on a copy of the sample data: another row shows that row's picture and
        # caption; an unsaved edit is kept across moves and said to be unsaved; Save changes that row's
        # line of metadata.csv and no other byte.
        editor = wait("the caption editor", lambda: cells[5].find_elements(By.CSS_SELECTOR, ".widget-vbox"), 60)[0]
        metadata = dataset / "metadata.csv"
        original, rows = metadata.read_bytes(), csv_rows(metadata)
        labels = js(CUT_LABELS, editor)
        checks["editor labels"] = len(labels)
        cut["caption editor"] = [text for text, scroll, client in labels if scroll > client]
        img = editor.find_element(By.CSS_SELECTOR, ".widget-image")
        caption_box = editor.find_element(By.CSS_SELECTOR, "textarea")
        # The panel's own labels: the readout beside the buttons, the status under the box (the text
        # box has a hidden label of its own).
        position = editor.find_element(By.XPATH, "./*[contains(@class,'widget-hbox')]/*[contains(@class,'widget-label')]")
        status = editor.find_element(By.XPATH, "./*[contains(@class,'widget-label')]")
        click = {name: editor.find_element(By.XPATH, f".//button[normalize-space()='{name}']")
                 for name in ("Previous", "Next", "Save")}

        def shows(row: int):  # the editor's readout, caption and picture, once they are row's (0-based)
            wanted = f"{row + 1} / {len(rows)}: {rows[row][0]}"
            wait(f"row {row + 1}", lambda: position.text == wanted, 30)
            return position.text, caption_box.get_property("value"), pixel_gap(js(PIXELS, img), dataset / rows[row][0])
        seen = [shows(0)]
        click["Next"].click()
        seen.append(shows(1))
        checks["editor rows shown: readout, caption, pixel gap"] = seen
        checks["editor captions in metadata.csv"] = [rows[0][1], rows[1][1]]
        new = 'a purple circle, "fixed by hand"'
        caption_box.send_keys(Keys.CONTROL, "a")
        caption_box.send_keys(new)
        wait("the unsaved count", lambda: status.text == "1 caption(s) not saved yet", 30)
        click["Next"].click()
        shows(2)
        click["Previous"].click()
        shows(1)
        checks["editor unsaved edit after Next, Previous"] = [caption_box.get_property("value"), status.text,
                                                              metadata.read_bytes() == original]
        click["Save"].click()
        wait("metadata.csv to change", lambda: metadata.read_bytes() != original, 30)
        wait("the editor to say saved", lambda: status.text.startswith("saved"), 30)
        checks["editor status after Save"] = status.text
        before, after = original.splitlines(keepends=True), metadata.read_bytes().splitlines(keepends=True)
        changed = [i for i in range(max(len(before), len(after)))
                   if i >= len(before) or i >= len(after) or before[i] != after[i]]
        checks["metadata.csv lines changed (0: header)"] = changed
        checks["metadata.csv line 2 now"] = after[2].decode() if len(after) > 2 else None
        expected = csv_line([rows[1][0], new], "\r\n" if original.endswith(b"\r\n") else "\n")
        labels = js(CUT_LABELS, editor)  # the status now names the file
        checks["editor labels after Save"] = len(labels)
        cut["caption editor after Save"] = [text for text, scroll, client in labels if scroll > client]
        click["Next"].click()
        shows(2)
        click["Previous"].click()
        checks["editor caption after Save, Next, Previous"] = shows(1)[1]
        shoot(cells[5], args.out / "caption_editor.png")

        checks["labels cut"] = cut
        failures = []
        if any(cut.values()):
            failures.append(f"labels cut: {cut}")
        if checks["scrubber readouts"] != ["step 1 of 6", "step 2 of 6", "step 4 of 6", "step 6 of 6"]:
            failures.append(f"scrubber readouts {checks['scrubber readouts']}")
        for name in ("sampler picture shown x natural", "scrubber picture shown x natural"):
            shown_w, _, natural_w, _ = checks[name]
            if abs(shown_w - natural_w) > 1:
                failures.append(f"{name}: shown {shown_w} px wide, its own width is {natural_w}")
        if "seed 1" not in caption:
            failures.append(f"sampler caption {caption!r}")
        for (readout, shown, gap), (name, wanted) in zip(checks["editor rows shown: readout, caption, pixel gap"], rows):
            if shown != wanted or gap > 2:
                failures.append(f"editor at {readout!r}: caption {shown!r} (metadata.csv: {wanted!r}), "
                                f"picture off by {gap} of 255 from {name}")
        if checks["editor unsaved edit after Next, Previous"] != [new, "1 caption(s) not saved yet", True]:
            failures.append(f"unsaved edit after moving: {checks['editor unsaved edit after Next, Previous']}")
        if changed != [2] or after[2] != expected:
            failures.append(f"Save changed metadata.csv lines {changed}, line 2 {after[2:3]} (wanted {expected})")
        if checks["editor caption after Save, Next, Previous"] != new:
            failures.append(f"saved caption shown back as {checks['editor caption after Save, Next, Previous']!r}")
        if not checks["editor status after Save"].startswith(f"saved 1 caption(s) to {metadata}"):
            failures.append(f"editor status after Save {checks['editor status after Save']!r}")
        if (ROOT / "data" / "sample" / "metadata.csv").read_bytes() != repo_sample:
            failures.append("the repository's data/sample/metadata.csv changed")
        checks["failures"] = failures
    except Exception as error:
        checks["failures"] = [f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"]
        if driver is not None:
            driver.save_screenshot(str(args.out / "failure.png"))
            checks["page at failure"] = page_state(driver, args.jupyter)
    finally:
        if driver is not None:
            try:  # every run: a failure's console then reads against a passing one's
                (args.out / "console.txt").write_text("".join(
                    f"{e['timestamp']} {e['level']} {e['message']}\n" for e in driver.get_log("browser")))
            except Exception as error:
                checks["console"] = f"not read: {type(error).__name__}"
            driver.quit()
        server.terminate()
        server.wait(30)
    (args.out / "summary.json").write_text(json.dumps(checks, indent=2) + "\n")
    print(json.dumps(checks, indent=2))
    print(f"Screenshots and summary: {args.out}")
    print("FAILED: " + "; ".join(checks["failures"]) if checks["failures"] else "All browser checks passed.")
    return 1 if checks["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
