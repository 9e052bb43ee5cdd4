"""`make test-browser`: notebook 08 in a real JupyterLab, driven by a headless Chromium (not part of `make test`).

    .venv/bin/python tests/browser_check.py [--timeout 600] [--keep]

1. trains the smoke profile's panoptic reference run (a minute on a CPU) under results/executed/browser/;
2. starts JupyterLab on 127.0.0.1 (a free port, a random token, this checkout as its root);
3. opens notebook 08 with `profile="smoke"`, `interactive=True` injected, runs every cell (Run > Run All Cells);
4. checks that the query slider shows the query the notebook's `select_pixel` chose, types another query
   into the slider's readout and checks that the explorer's figure changes; then the object threshold
   (0.8 -> 0.05) and the same; and that the browser console holds no error;
5. leaves screenshots in results/executed/browser/ (page, figure before, after the query, after the threshold).

Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium chromium-driver) and `selenium`
(the `browser` extra: pip install -e ".[browser]"). Exit code 0 when every check passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "results" / "executed" / "browser"


def prepare(out: Path) -> Path:
    """The smoke run notebook 08 reads, trained here (not in the browser), and notebook 08 with the browser
    run's parameters injected (papermill's own injection, so the notebook itself is unchanged)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from mfcore.companion import experiments

    params = dict(profile="smoke", results_dir=str(out / "results"), cache_dir=str(out / "cache"), device="cpu",
                  progress="off", interactive=True)
    ctx = experiments.make_context("smoke", params["results_dir"], device="cpu", progress="off",
                                   cache_dir=params["cache_dir"])
    experiments.run_checkpoint(ctx, experiments.base_spec(ctx, "maskformer", panoptic=True))
    nb = load_notebook_node(str(REPO / "notebooks" / "08_explorer.ipynb"))
    nb = parameterize_notebook(nb, params)
    path = out / "08_explorer.ipynb"
    nbformat.write(nb, path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(port: int, token: str, log: Path) -> subprocess.Popen:
    jupyter = Path(sys.executable).with_name("jupyter")
    cmd = [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={REPO}", "--LabApp.news_url=", f"--LabApp.workspaces_dir={log.parent / 'workspaces'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root; the server refuses it otherwise
        cmd.append("--allow-root")
    process = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                   [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {process.returncode}; see {log}")
            time.sleep(1)
    process.terminate()
    raise RuntimeError(f"jupyter lab did not answer on port {port} within 120 s; see {log}")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, read by check()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1700,1300"):
        options.add_argument(arg)
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary:
        options.binary_location = binary
    driver = shutil.which("chromedriver")
    return webdriver.Chrome(options=options, service=Service(driver) if driver else None)


def click_menu(driver, wait, menu: str, item: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel')][normalize-space()='{menu}']"))).click()
    wait.until(ec.element_to_be_clickable(
        (By.XPATH, f"//div[contains(@class,'lm-Menu-itemLabel')][normalize-space()='{item}']"))).click()


def figure_element(driver):
    """The explorer's figure: ipympl's canvas when the widget backend is on, else the Output widget's image."""
    from selenium.webdriver.common.by import By

    for selector in (".jupyter-matplotlib-figure canvas", ".jupyter-matplotlib canvas", ".widget-output img",
                     ".jupyter-widgets-output-area img"):
        found = [e for e in driver.find_elements(By.CSS_SELECTOR, selector) if e.size["width"] > 100]
        if found:
            return found[-1], selector
    return None, None


def slider_readout(driver, label: str):
    """The editable readout of the explorer's slider labelled `label` (None before it is drawn)."""
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.XPATH, f"//div[contains(@class,'widget-slider')][.//label[normalize-space()="
                                           f"'{label}']]//div[contains(@class,'widget-readout')]")
    return found[0] if found else None


def set_slider(driver, label: str, value: str, timeout: float = 60) -> bool:
    """Type `value` into the slider's readout; whether the explorer's figure changed within `timeout` s."""
    from selenium.webdriver.common.keys import Keys

    before = figure_element(driver)[0].screenshot_as_png
    readout = slider_readout(driver, label)
    readout.click()
    readout.send_keys(Keys.CONTROL, "a")
    readout.send_keys(value, Keys.ENTER)
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(2)
        if figure_element(driver)[0].screenshot_as_png != before:
            return True
    return False


def check(timeout: float, out: Path) -> list[str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    failures: list[str] = []
    notebook = prepare(out)
    port, token = free_port(), secrets.token_hex(16)
    lab = start_lab(port, token, out / "jupyterlab.log")
    driver = browser()
    try:
        wait = WebDriverWait(driver, timeout)
        rel = notebook.relative_to(REPO).as_posix()
        driver.get(f"http://127.0.0.1:{port}/lab/tree/{rel}?token={token}&reset")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
        time.sleep(5)  # the kernel starts
        click_menu(driver, WebDriverWait(driver, 60), "Run", "Run All Cells")
        readout = wait.until(lambda d: slider_readout(d, "query"))
        wait.until(lambda d: figure_element(d)[0] is not None)
        time.sleep(3)  # the first draw
        driver.save_screenshot(str(out / "page.png"))
        page = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
        printed = re.search(r"'query': (\d+)", page)
        shown = readout.text.strip()
        if not printed:
            failures.append("the state printed by notebook 08 is not on the page")
        elif shown != printed.group(1):
            failures.append(f"the query slider shows {shown}, select_pixel chose query {printed.group(1)}")
        element, kind = figure_element(driver)
        (out / "figure_before.png").write_bytes(element.screenshot_as_png)
        new = 0 if shown != "0" else 1
        changed = set_slider(driver, "query", str(new))
        (out / "figure_after.png").write_bytes(figure_element(driver)[0].screenshot_as_png)
        driver.save_screenshot(str(out / "page_after.png"))
        if slider_readout(driver, "query").text.strip() != str(new):
            failures.append(f"the query slider's readout shows {slider_readout(driver, 'query').text.strip()!r} "
                            f"after typing {new}")
        if not changed:
            failures.append(f"the explorer's figure ({kind}) did not change after moving the query slider")
        # a low object threshold keeps queries the default 0.8 drops: the panoptic panel must redraw
        threshold_changed = set_slider(driver, "object thr", "0.05")
        element, _ = figure_element(driver)
        (out / "figure_threshold.png").write_bytes(element.screenshot_as_png)
        if not threshold_changed:
            failures.append("the explorer's figure did not change after moving the object threshold to 0.05")
        errors = [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        if errors:
            failures.append(f"the browser console has {len(errors)} error(s), first: {errors[0][:300]}")
        print(f"figure drawn as {kind}; query slider {shown} -> {new}, figure changed: {changed}; object threshold "
              f"0.8 -> 0.05, figure changed: {threshold_changed}; console errors: {len(errors)}")
    finally:
        driver.quit()
        lab.terminate()
        try:
            lab.wait(20)
        except subprocess.TimeoutExpired:
            lab.kill()
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the notebook to run")
    args = parser.parse_args()
    try:
        import selenium  # noqa: F401
    except ImportError:
        sys.exit("test-browser: selenium is missing: pip install -e '.[browser]'")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        sys.exit("test-browser: needs chromium and chromedriver: apt-get install chromium chromium-driver")
    OUT.mkdir(parents=True, exist_ok=True)
    failures = check(args.timeout, OUT)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    print(json.dumps({"passed": not failures, "screenshots": sorted(p.name for p in OUT.glob("*.png"))}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
