"""The playground page of `sdtrt serve` in a real browser: Debian's Chromium, driven by Selenium, against a real
server process on loopback with the shipped demo model, its ControlNet, a random tiny VAE, a LoRA adapter and an
API key.

The page asks for the key; what it draws (ControlNet and LoRA included) is, byte for byte, the PNG the API returns
for the same request; an error is the API's one line; cancel stops the job on the server. The browser tests are
marked `browser` and skip where chromium / chromedriver are not installed (apt-get install chromium
chromium-driver). A screenshot of each test's page is saved under the test's tmp_path, and under
$SDTRT_SCREENSHOTS when set (docs/playground.png is one).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from test_serve import demo_lora  # noqa: E402, F401 (a fixture: a random LoRA "style" for the demo model)

from benchmarks.serving import ServerProcess  # noqa: E402
from sdtrt.demo import demo_controlnet_dir, demo_maps  # noqa: E402
from sdtrt.serve.playground import STATIC  # noqa: E402

API_KEY = "playground-key-42"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_STEPS = 1000  # the runtime's ceiling, the server's limit here: a cancelled request is still drawing
WAIT_S = 60.0
CHROMIUM_FLAGS = (  # a headless browser that reaches for nothing beyond loopback (the closed network stalls it)
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1200",
)


@pytest.fixture(scope="module")
def playground_export(demo_export: Path, taesd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo export with the demo's ControlNet attached as "map" and a random-weight tiny VAE (the
    progress previews are its decodes)."""
    from sdtrt.export.controlnet import attach_controlnet
    from sdtrt.export.tiny_vae import attach_tiny_vae

    folder = Path(shutil.copytree(demo_export, tmp_path_factory.mktemp("playground") / "tiny-sd"))
    attach_controlnet(folder, demo_controlnet_dir(), name="map")
    attach_tiny_vae(folder, taesd_dir)
    return folder


@pytest.fixture(scope="module")
def server(playground_export: Path, demo_lora: Path) -> Iterator[ServerProcess]:  # noqa: F811
    args = [str(playground_export), "--backend", "ort-cpu", "--max-batch", "1", "--max-steps", str(MAX_STEPS)]
    args += ["--lora", f"tiny-sd={demo_lora}"]
    proc = ServerProcess(args, env={"SDTRT_API_KEY": API_KEY})
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser: object, server: ServerProcess, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """The playground freshly loaded, the API key entered, the models listed; a screenshot at the end."""
    _open(browser, server)
    _enter_key(browser, API_KEY)
    _wait(browser, lambda d: d.find_element("id", "server-status").text == "1 model(s) served.")
    yield browser
    _screenshot(browser, request.node.name, tmp_path)


# -- without a browser: the page needs no key and nothing from elsewhere --------------------------------------


def test_the_page_is_served_without_the_key_and_the_api_needs_it(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        index = client.get("/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        for asset in re.findall(r'(?:src|href)="(playground/[^"]+)"', index.text):
            assert client.get(f"/{asset}").status_code == 200, asset
        assert client.get("/v1/models").status_code == 401
        assert client.get("/playground/missing.js").json()["error"]["type"] == "not_found"
        models = client.get("/v1/models", headers=AUTH).json()
    (model,) = models["data"]
    assert model["id"] == "tiny-sd" and model["ready"] and (model["width"], model["height"]) == (64, 64)
    assert model["loras"] == ["style"] and model["controlnets"] == ["map"] and model["max_side"] == 128
    assert "euler_a" in models["schedulers"] and models["max_steps"] == MAX_STEPS


def test_the_page_loads_nothing_from_elsewhere() -> None:
    """No CDN, no web font: every URL the page's files name is its own (it works offline)."""
    for path in STATIC.iterdir():
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", path.read_text()), path.name


# -- in the browser -------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_the_page_asks_for_the_key_and_keeps_it_for_the_tab(browser: object, server: ServerProcess) -> None:
    _open(browser, server)
    _wait(browser, lambda d: d.find_element("id", "key-dialog").get_attribute("open") is not None)
    assert browser.switch_to.active_element.get_attribute("id") == "api-key"  # the focus is in the dialog
    assert "API key" in browser.find_element("id", "key-reason").text
    _enter_key(browser, "a-wrong-key")
    _wait(browser, lambda d: d.find_element("id", "key-dialog").get_attribute("open") is not None)
    _enter_key(browser, API_KEY)
    _wait(browser, lambda d: d.find_element("id", "server-status").text == "1 model(s) served.")
    assert browser.execute_script("return sessionStorage.getItem('sdtrt-api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0  # kept for the tab only
    browser.refresh()  # the same tab: no question again
    _wait(browser, lambda d: d.find_element("id", "server-status").text == "1 model(s) served.")
    assert browser.find_element("id", "key-dialog").get_attribute("open") is None


@pytest.mark.browser
def test_the_images_shown_are_the_pngs_the_api_returns(page: object, server: ServerProcess) -> None:
    _fill(page, prompt="a red circle on a blue background", negative_prompt="green", steps=4, guidance=1.5, seed=7)
    _fill_id(page, "num-images", "2")
    _select(page, "scheduler", "euler_a")
    page.find_element("id", "generate").click()
    images = _results(page, 2)
    body = {
        "model": "tiny-sd",
        "prompt": "a red circle on a blue background",
        "negative_prompt": "green",
        "width": 64,
        "height": 64,
        "num_images": 2,
        "num_inference_steps": 4,
        "guidance_scale": 1.5,
        "seed": 7,
        "scheduler": "euler_a",
    }
    assert [_png(image.get_attribute("src")) for image in images] == _api_pngs(server, body)
    captions = [caption.text for caption in page.find_elements("css selector", ".result figcaption")]
    assert captions[0].startswith("seed 7 · image 1 of 2 · tiny-sd · 64×64 · euler_a · ")
    downloads = page.find_elements("css selector", ".result-download")
    assert [link.get_attribute("href") for link in downloads] == [image.get_attribute("src") for image in images]
    assert [link.get_attribute("download") for link in downloads] == ["sdtrt-tiny-sd-7-0.png", "sdtrt-tiny-sd-7-1.png"]
    assert page.find_element("id", "generate").is_enabled() and not page.find_element("id", "cancel").is_enabled()
    assert page.find_element("id", "status").text.startswith("Drew 2 image(s) in ")

    _fill_id(page, "seed", "")  # left empty: the page draws a seed, shows it, and it reproduces the image
    page.find_element("id", "generate").click()
    newest = _results(page, 4)[0]  # two more, the newest first
    seed = int(newest.get_attribute("data-seed"))
    assert f"seed {seed} · " in page.find_element("css selector", ".result figcaption").text
    assert _png(newest.get_attribute("src")) == _api_pngs(server, {**body, "seed": seed})[0]


@pytest.mark.browser
def test_controlnet_image_from_a_file_and_a_lora_scale(page: object, server: ServerProcess) -> None:
    """The ControlNet's map comes from a file input; the LoRA adapter at 0.5: the API's PNG for the same body."""
    from selenium.webdriver.common.keys import Keys

    control = demo_maps()["circle-top-left"]
    _fill(page, prompt="a red circle", steps=4, guidance=1.5, seed=11)
    _fill_id(page, "lora-0", "0.5")
    page.find_element("id", "control-image-0").send_keys(str(control))
    _fill_id(page, "control-weight-0", "0.8")
    page.find_element("id", "prompt").send_keys(Keys.CONTROL + Keys.ENTER)  # Ctrl+Enter from the prompt draws
    (image,) = _results(page, 1)
    body = {
        "model": "tiny-sd",
        "prompt": "a red circle",
        "width": 64,
        "height": 64,
        "num_images": 1,
        "num_inference_steps": 4,
        "guidance_scale": 1.5,
        "seed": 11,
        "loras": {"style": 0.5},
        "controlnet": ["map"],
        "control_image": [base64.b64encode(control.read_bytes()).decode()],
        "controlnet_conditioning_scale": [0.8],
    }
    shown = _png(image.get_attribute("src"))
    assert shown == _api_pngs(server, body)[0]
    plain = {k: v for k, v in body.items() if k not in ("loras", "controlnet", "control_image")}
    del plain["controlnet_conditioning_scale"]
    assert shown != _api_pngs(server, plain)[0]  # the map and the adapter changed the picture


@pytest.mark.browser
def test_a_size_over_the_limit_shows_the_apis_one_line_error(page: object, server: ServerProcess) -> None:
    _fill(page, prompt="too big", steps=2, seed=1)
    _fill_id(page, "width", "256")
    page.find_element("id", "generate").click()
    error = _wait(page, lambda d: d.find_element("id", "error").is_displayed() and d.find_element("id", "error"))
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        body = {"model": "tiny-sd", "prompt": "too big", "width": 256, "height": 64, "num_inference_steps": 2}
        answer = client.post("/v1/txt2img", json={**body, "seed": 1})
    assert answer.status_code == 400
    assert error.text == answer.json()["error"]["message"] and "256" in error.text and "\n" not in error.text
    assert page.find_elements("css selector", ".result") == []
    assert page.find_element("id", "generate").is_enabled()


@pytest.mark.browser
def test_progress_preview_and_cancel_stop_the_job_on_the_server(page: object, server: ServerProcess) -> None:
    from PIL import Image
    from selenium.webdriver.common.keys import Keys

    _fill(page, prompt="a long one", steps=MAX_STEPS, guidance=1.5, seed=3)
    _fill_id(page, "width", "128")
    _fill_id(page, "height", "128")
    page.find_element("id", "generate").click()
    _wait_drawing(page)
    _wait(page, lambda d: "tiny VAE" in d.find_element("id", "preview").get_attribute("title"))
    preview = Image.open(io.BytesIO(_png(page.find_element("id", "preview").get_attribute("src"))))
    assert preview.size == (128, 128)  # the tiny VAE's decode of the current latents: the image's size
    assert float(page.find_element("id", "progress").get_attribute("value")) > 0
    _screenshot(page, "drawing", None)
    assert page.switch_to.active_element.get_attribute("id") == "cancel"  # the focus moved to Cancel
    page.find_element("id", "cancel").click()
    _wait(page, lambda d: d.find_element("id", "status").text == "Cancelled.")
    assert page.find_elements("css selector", ".result") == [] and not page.find_element("id", "error").is_displayed()
    _stopped_on_the_server(server, 1)

    page.find_element("id", "generate").click()  # again, and Escape cancels it
    _wait_drawing(page)
    page.switch_to.active_element.send_keys(Keys.ESCAPE)
    _wait(page, lambda d: d.find_element("id", "status").text == "Cancelled.")
    _stopped_on_the_server(server, 2)

    _fill_id(page, "steps", "2")  # and the page draws after a cancel
    page.find_element("id", "generate").click()
    _results(page, 1)


# -- helpers --------------------------------------------------------------------------------------------------


def _wait_drawing(driver: object) -> None:
    """Until the progress bar shows a step of the page's own request."""
    _wait(driver, lambda d: re.fullmatch(r"Step [1-9]\d* of \d+", d.find_element("id", "progress-label").text))


def _stopped_on_the_server(server: ServerProcess, count: int) -> None:
    """Wait until the server's log says it stopped ``count`` jobs (in all) because their client went away,
    each before its last step, and it runs none."""
    pattern, deadline = re.compile(r"stopped at step (\d+) of (\d+): cancelled"), time.monotonic() + WAIT_S
    while len(pattern.findall(server.log.getvalue())) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = pattern.findall(server.log.getvalue())
    assert len(stopped) == count and all(int(done) < int(total) for done, total in stopped), stopped
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def _open(driver: object, server: ServerProcess) -> None:
    driver.get(f"{server.url}/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{server.url}/")


def _wait(driver: object, condition: object) -> object:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)


def _enter_key(driver: object, key: str) -> None:
    _wait(driver, lambda d: d.find_element("id", "key-dialog").get_attribute("open") is not None)
    _fill_id(driver, "api-key", key)
    driver.find_element("id", "key-submit").click()


def _fill_id(driver: object, element_id: str, text: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(text)


def _fill(driver: object, prompt: str, steps: int, seed: int, guidance: float | None = None, **text: str) -> None:
    _fill_id(driver, "prompt", prompt)
    _fill_id(driver, "steps", str(steps))
    _fill_id(driver, "seed", str(seed))
    if guidance is not None:
        _fill_id(driver, "guidance", str(guidance))
    for name, value in text.items():
        _fill_id(driver, name.replace("_", "-"), value)


def _select(driver: object, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", element_id)).select_by_value(value)


def _results(driver: object, count: int) -> list[object]:
    return _wait(driver, lambda d: len(found := d.find_elements("css selector", ".result-image")) == count and found)


def _png(data_url: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix), data_url[:40]
    return base64.b64decode(data_url.removeprefix(prefix))


def _api_pngs(server: ServerProcess, body: dict) -> list[bytes]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        answer = client.post("/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    return [base64.b64decode(image) for image in answer.json()["images"]]


def _screenshot(driver: object, name: str, tmp_path: Path | None) -> None:
    folders = [tmp_path] if tmp_path else []
    if os.environ.get("SDTRT_SCREENSHOTS"):
        folders.append(Path(os.environ["SDTRT_SCREENSHOTS"]))
    driver.execute_script("window.scrollTo(0, 0)")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"playground-{name}.png"))
