"""The operator dashboard (tiny base, adapters alpha and beta, three jobs), through its JSON
routes and in headless Chromium (Debian's chromium + chromium-driver, driven by selenium; no
browser is downloaded). The tests run in order.

The page, its assets and the JSON routes run in process (`service`: the HTTP app over a
real Server; the routes are the app's own, and a pin written by another process is
written with the `lorafleet` CLI). The browser needs a URL to load: its cases run on one
`lorafleet serve` (`bento`).

The screenshot of the page goes to tests/artifacts/dashboard.png (LORAFLEET_ARTIFACTS
overrides the folder); docs/serving.md shows a copy of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from registry import Registry
from registry.profile import CLASSIFIER_SIGNALS
from registry.storage import jobs

ARTIFACTS = Path(os.environ.get("LORAFLEET_ARTIFACTS", Path(__file__).parents[1] / "artifacts"))
PROMPT = "Review: the soup was cold and the waiter rude.\nSentiment:"
WAIT_S = 30.0
NONE = "\N{EN DASH}"  # what the page shows for a missing value


def dashboard_home(
    tmp: Path,
    base: Path,
    adapter_factory: Callable[..., Path],
    profiled_copy: Callable[[Path, Path, Path], Path],
) -> dict[str, Path]:
    """A registry at tmp/home: alpha@1 (production, with a drift profile), alpha@2 (no alias),
    beta@1 (production) and the jobs of `add_jobs`; returns {ref: directory}."""
    alpha = profiled_copy(base, adapter_factory(base, rank=4, seed=41), tmp / "alpha")
    registry = Registry.create(tmp / "home", base, actor="tests")
    registry.register("alpha", alpha, metadata={"drift_profile": "profile.json"})
    registry.promote("alpha", 1, reason="first release")
    registry.register("alpha", adapter_factory(base, rank=4, seed=42))
    registry.register("beta", adapter_factory(base, rank=4, seed=43))
    registry.promote("beta", 1)
    add_jobs(registry)
    registry.close()
    return {"alpha@1": alpha}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve_in_process: Callable[..., AbstractContextManager[Any]],
    profiled_copy: Callable[[Path, Path, Path], Path],
) -> Iterator[Any]:
    """The HTTP app over a real Server in this process, on `dashboard_home`."""
    tmp = tmp_path_factory.mktemp("dashboard-app")
    adapters = dashboard_home(tmp, tiny_base, adapter_factory, profiled_copy)
    options = {"max_len": 256, "drift_window": 40, "drift_min_samples": 8}
    with serve_in_process(tmp / "home", tiny_base, adapters, **options) as running:
        yield running


@pytest.fixture(scope="module")
def bento(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_base: Path,
    adapter_factory: Callable[..., Path],
    serve: Callable[..., AbstractContextManager[Any]],
    profiled_copy: Callable[[Path, Path, Path], Path],
) -> Iterator[Any]:
    """`lorafleet serve` on `dashboard_home` with the options of `service`, and the traffic
    the JSON cases send before the browser's (beta 2 requests, alpha 8), as when they ran
    on this server."""
    tmp = tmp_path_factory.mktemp("dashboard")
    adapters = dashboard_home(tmp, tiny_base, adapter_factory, profiled_copy)
    options = ("--max-len", "256", "--drift-window", "40", "--drift-min-samples", "8")
    with serve(tmp / "home", tiny_base, adapters, *options) as running:
        complete(running, "beta", 2)
        complete(running, "alpha", 8)
        yield running


def add_jobs(registry: Registry) -> None:
    """Job 1: alpha, from an alert, registered v2 (gate passed); job 2: beta, on schedule,
    refused by the gate; job 3: beta, queued by hand."""
    done, _ = jobs.queue_job(registry.db, "alpha", "alert:5e1ec7ed", actor="alertmanager")
    jobs.claim_job(registry.db, actor="runner")
    gate = {"passed": True, "failures": []}
    jobs.finish_job(
        registry.db,
        done.id,
        succeeded=True,
        actor="runner",
        summary="registered alpha@2",
        version=2,
        result={"gate": gate},
    )
    refused, _ = jobs.queue_job(registry.db, "beta", "schedule", actor="scheduler")
    jobs.claim_job(registry.db, actor="runner")
    gate = {"passed": False, "failures": ["eval loss 0.91 > production's 0.50 x 1.00"]}
    jobs.finish_job(
        registry.db,
        refused.id,
        succeeded=False,
        actor="runner",
        summary="gate failed",
        result={"gate": gate},
        error="gate failed: eval loss 0.91 > production's 0.50 x 1.00",
    )
    jobs.queue_job(registry.db, "beta", actor="alice", reason="new data")


def production(service: Any, adapter: str) -> int:
    registry = Registry(service.home)
    try:
        return registry.resolve(adapter).version
    finally:
        registry.close()


def events(service: Any, adapter: str) -> list[Any]:
    registry = Registry(service.home)
    try:
        return registry.history(adapter)
    finally:
        registry.close()


def complete(service: Any, model: str, n: int) -> None:
    for i in range(n):
        body = {"model": model, "prompt": f"{PROMPT} {i}", "max_tokens": 3, "temperature": 0}
        assert service.http.post("/v1/completions", json=body).status_code == 200


# ---- the JSON behind the page -------------------------------------------------------------


def test_page_and_assets_are_served_without_a_key_with_a_strict_policy(service: Any) -> None:
    page = service.http.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'src="dashboard/dashboard.js"' in page.text
    script = service.http.get("/dashboard/dashboard.js")
    assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
    assert service.http.get("/dashboard/dashboard.css").status_code == 200
    missing = service.http.get("/dashboard/secrets.txt")
    assert missing.status_code == 404
    assert "no dashboard file 'secrets.txt'" in missing.json()["error"]["message"]


def test_state_needs_the_admin_key(service: Any) -> None:
    assert service.admin("/admin/dashboard", key="wrong").status_code == 401
    assert service.http.get("/admin/dashboard").status_code == 401
    assert service.admin("/admin/pin", {"adapter": "beta"}, key="wrong").status_code == 401


def test_state_has_the_fleet_residency_and_traffic(service: Any) -> None:
    complete(service, "beta", 2)
    state = service.admin("/admin/dashboard").json()
    adapters = {a["name"]: a for a in state["fleet"]["adapters"]}
    assert sorted(adapters) == ["alpha", "beta"]
    assert [v["version"] for v in adapters["alpha"]["versions"]] == [1, 2]
    assert adapters["alpha"]["aliases"]["production"]["version"] == 1
    move = adapters["alpha"]["last_move"]
    assert (move["action"], move["version"], move["reason"]) == ("alias.set", 1, "first release")
    assert "beta@1" in state["residency"]["resident"]
    beta = next(v for v in state["traffic"]["versions"] if v["model"] == "beta@1")
    assert state["traffic"]["recent"]["beta@1"]["requests"] == 2
    assert max(beta["requests_per_s"]) > 0 and beta["p95_s"][-1] is not None
    only = service.admin("/admin/dashboard?adapter=ALP&series=1").json()["traffic"]
    assert only["versions"] == [] and only["matching"] == 0  # alpha has had no traffic yet
    assert service.admin("/admin/dashboard?series=0").status_code == 422
    assert state["server"]["engine"] == "hf"
    assert set(state["drift"]["thresholds"]) >= {"prompt_length", "prompt_tokens"}


def test_pin_and_unpin_keep_the_adapter_resident_and_land_in_history(
    service: Any, cli: Callable[..., Any]
) -> None:
    answer = service.admin("/admin/pin", {"adapter": "beta", "reason": "hot adapter"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["resident_pinned"] == ["beta@1"]
    residency = service.admin("/admin/residency").json()
    assert residency["pinned"] == ["beta@1"]
    last = events(service, "beta")[-1]
    assert (last.action, last.reason, last.actor) == ("adapter.pin", "hot adapter", "api:tester")
    answer = service.admin("/admin/unpin", {"adapter": "beta", "reason": "cooled down"})
    assert answer.status_code == 200 and answer.json()["resident_pinned"] == []
    assert service.admin("/admin/residency").json()["pinned"] == []
    assert events(service, "beta")[-1].action == "adapter.unpin"
    # a pin written by another process (the CLI) is followed within a poll interval
    pinned = cli(
        "registry", "pin", "beta", "--actor", "cli", "--reason", "from the CLI", home=service.home
    )
    assert pinned.returncode == 0, pinned.stderr
    deadline = time.monotonic() + WAIT_S
    while service.admin("/admin/residency").json()["pinned"] != ["beta@1"]:
        assert time.monotonic() < deadline, "the server did not follow the registry's pin"
        time.sleep(0.1)
    assert service.admin("/admin/unpin", {"adapter": "beta", "reason": "x"}).status_code == 200
    unknown = service.admin("/admin/pin", {"adapter": "gamma", "reason": "x"})
    assert unknown.status_code == 404
    assert "registered adapters: alpha, beta" in unknown.json()["error"]["message"]


def test_drift_plots_are_the_drift_report_pngs(service: Any) -> None:
    complete(service, "alpha", 8)
    answer = service.admin("/admin/dashboard/drift?model=alpha")
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["model"] == "alpha@1" and report["baseline"] is True
    # A generation adapter: every signal but a classifier's own is drawn.
    assert set(report["plots"]) == set(report["signals"]) - set(CLASSIFIER_SIGNALS)
    assert all(uri.startswith("data:image/png;base64,iVBOR") for uri in report["plots"].values())
    missing = service.admin("/admin/dashboard/drift?model=alpha@9")
    assert missing.status_code == 404


# ---- in the browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(
    tmp_path_factory: pytest.TempPathFactory, require_binary: Callable[[str], str]
) -> Iterator[Any]:
    chromium, driver = require_binary("chromium"), require_binary("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,2200",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    session = webdriver.Chrome(service=DriverService(executable_path=driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except Exception as err:  # an element not there yet, or replaced by a poll
            value, last = None, err
        else:
            last = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} ({last})")
        time.sleep(0.2)


def by_css(browser: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(browser.find_elements(By.CSS_SELECTOR, selector))


def text_of(browser: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.ID, element_id).text)


def enter_key(browser: Any, key: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.ID, "admin-key")
    field.clear()
    field.send_keys(key, Keys.ENTER)  # the keyboard submits the form


def choose(browser: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, element_id)).select_by_value(value)


def fill(browser: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def console_errors(browser: Any) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_page_lists_adapters_and_aliases(bento: Any, browser: Any) -> None:
    browser.get(f"{bento.url}/dashboard")
    assert "enter the server's admin key" in text_of(browser, "status").lower()
    enter_key(browser, bento.admin_key)
    wait_for("the fleet table", lambda: by_css(browser, "#fleet-table tbody[data-adapter=beta]"))

    def listed() -> list[str | None]:  # a poll may re-render the table between two reads
        return [b.get_attribute("data-adapter") for b in by_css(browser, "#fleet-table tbody")]

    wait_for("alpha and beta listed", lambda: listed() == ["alpha", "beta"])
    alpha1 = by_css(browser, "tr[data-adapter=alpha][data-version='1'] td.aliases")[0]
    assert alpha1.text == "production"
    assert by_css(browser, "tr[data-adapter=alpha][data-version='2'] td.aliases")[0].text == ""
    assert "first release" in by_css(browser, "tbody[data-adapter=alpha] .meta")[0].text
    fill(browser, "filter", "bet")
    try:
        wait_for("beta alone", lambda: listed() == ["beta"])
    finally:  # the browser is shared: the next tests need every adapter shown
        fill(browser, "filter", "")
    wait_for("both adapters again", lambda: len(by_css(browser, "#fleet-table tbody")) == 2)
    assert "Live" in text_of(browser, "status")
    assert console_errors(browser) == []


def test_jobs_show_trigger_state_version_and_verdicts(bento: Any, browser: Any) -> None:
    def row(job: int) -> list[str]:
        cells = by_css(browser, f"#jobs-table tr[data-job='{job}'] td")
        return [c.text for c in cells]

    alerted, refused, queued = row(1), row(2), row(3)
    assert alerted[1:4] == ["alpha", "succeeded", "alert 5e1ec7ed"]
    assert alerted[6:9] == ["v2", "passed", "pending"]  # registered; no canary verdict yet
    assert refused[1:4] == ["beta", "failed", "schedule"]
    assert refused[7] == "failed: eval loss 0.91 > production's 0.50 x 1.00"
    assert refused[9] == ""  # the gate's refusal is shown once, in the gate column
    assert queued[1:4] == ["beta", "queued", "manual"] and queued[5:7] == [NONE, NONE]


def test_charts_show_traffic_for_the_right_adapter(bento: Any, browser: Any) -> None:
    complete(bento, "alpha", 12)

    def peak(model: str) -> float:
        paths = by_css(browser, f"#chart-requests_per_s path[data-model='{model}']")
        return float(paths[0].get_attribute("data-max") or 0) if paths else 0.0

    wait_for("alpha@1's request rate in the chart", lambda: peak("alpha@1") > 0)
    rate = by_css(browser, "tr[data-adapter=alpha][data-version='1'] td.rate")[0]
    assert float(rate.text) > 0
    assert by_css(browser, "tr[data-adapter=alpha][data-version='2'] td.rate")[0].text == "0.00"
    assert peak("alpha@2") == 0.0  # no line: it served nothing
    for chart in ("p95_s", "completion_tokens_per_s", "error_rate"):
        assert by_css(browser, f"#chart-{chart} path[data-model='alpha@1']")
    wait_for(
        "alpha@1's drift charts", lambda: by_css(browser, ".drift-version[data-model='alpha@1']")
    )


def test_promote_through_the_page_moves_the_alias_and_the_traffic(bento: Any, browser: Any) -> None:
    choose(browser, "act-kind", "promote")
    choose(browser, "act-adapter", "alpha")
    fill(browser, "act-alias", "production")
    choose(browser, "act-version", "2")
    fill(browser, "act-reason", "browser promote")
    by_css(browser, "#act-submit")[0].click()
    wait_for("the promote's answer", lambda: text_of(browser, "action-result").startswith("Done"))
    assert production(bento, "alpha") == 2
    last = events(bento, "alpha")[-1]
    assert (last.action, last.version, last.reason) == ("alias.set", 2, "browser promote")
    assert bento.served("alpha")[0] == "alpha@2"
    wait_for(
        "the production badge on v2",
        lambda: (
            by_css(browser, "tr[data-adapter=alpha][data-version='2'] td.aliases")[0].text
            == "production"
        ),
    )


def test_a_refused_action_shows_the_servers_reason(bento: Any, browser: Any) -> None:
    choose(browser, "act-kind", "promote")
    choose(browser, "act-adapter", "beta")
    fill(browser, "act-alias", "production")
    fill(browser, "act-reason", "")
    by_css(browser, "#act-submit")[0].click()
    assert "Give a reason" in text_of(browser, "action-result")
    before = Registry(bento.home)
    revision = before.revision()
    before.close()
    fill(browser, "act-alias", "no such alias!")
    fill(browser, "act-reason", "bad alias")
    by_css(browser, "#act-submit")[0].click()
    message = wait_for("the refusal", lambda: "Refused" in text_of(browser, "action-result"))
    assert message
    assert "alias" in text_of(browser, "action-result")
    after = Registry(bento.home)
    assert after.revision() == revision
    after.close()


def test_a_wrong_key_shows_an_error_and_changes_nothing(bento: Any, browser: Any) -> None:
    registry = Registry(bento.home)
    revision = registry.revision()
    registry.close()
    enter_key(browser, "not-the-key")
    wait_for("the key error", lambda: "Wrong admin key" in text_of(browser, "error"))
    assert "Wrong admin key" in text_of(browser, "status")
    choose(browser, "act-kind", "rollback")
    choose(browser, "act-adapter", "alpha")
    fill(browser, "act-alias", "production")
    fill(browser, "act-reason", "should not happen")
    by_css(browser, "#act-submit")[0].click()
    wait_for("the refusal", lambda: "Wrong admin key" in text_of(browser, "action-result"))
    registry = Registry(bento.home)
    assert registry.revision() == revision
    assert registry.resolve("alpha").version == 2
    registry.close()
    enter_key(browser, bento.admin_key)
    wait_for("the error to clear", lambda: not by_css(browser, "#error:not([hidden])"))


def test_pin_and_canary_weight_through_the_page(bento: Any, browser: Any) -> None:
    choose(browser, "act-kind", "pin")
    choose(browser, "act-adapter", "beta")
    fill(browser, "act-reason", "pinned from the page")
    by_css(browser, "#act-submit")[0].click()
    wait_for("the pin's answer", lambda: text_of(browser, "action-result").startswith("Done"))
    assert bento.admin("/admin/residency").json()["pinned"] == ["beta@1"]
    wait_for("the pinned badge", lambda: by_css(browser, "tbody[data-adapter=beta] th .pinned"))
    # canary: alpha@1 at 10 %, then its weight to 25 %
    choose(browser, "act-kind", "promote")
    choose(browser, "act-adapter", "alpha")
    fill(browser, "act-alias", "canary")
    choose(browser, "act-version", "1")
    fill(browser, "act-weight", "0.1")
    fill(browser, "act-reason", "try v1 again")
    by_css(browser, "#act-submit")[0].click()
    wait_for("the canary's answer", lambda: text_of(browser, "action-result").startswith("Done"))
    choose(browser, "act-kind", "weight")
    fill(browser, "act-weight", "1.5")
    fill(browser, "act-reason", "too much")
    by_css(browser, "#act-submit")[0].click()
    assert "not a number in [0, 1]" in text_of(browser, "action-result")
    fill(browser, "act-weight", "0.25")
    fill(browser, "act-reason", "more canary traffic")
    by_css(browser, "#act-submit")[0].click()
    wait_for("the weight's answer", lambda: text_of(browser, "action-result").startswith("Done"))
    registry = Registry(bento.home)
    canary = next(a for a in registry.aliases("alpha") if a.alias == "canary")
    registry.close()
    assert (canary.version, canary.weight) == (1, 0.25)
    assert events(bento, "alpha")[-1].reason == "more canary traffic"
    wait_for(
        "the canary badge",
        lambda: "canary 25%" in by_css(browser, "tr[data-adapter=alpha][data-version='1']")[0].text,
    )


def test_a_screenshot_and_the_drift_distributions(bento: Any, browser: Any) -> None:
    complete(bento, "alpha@1", 8)
    button = wait_for(
        "the drift button",
        lambda: by_css(browser, ".drift-version[data-model='alpha@1'] button"),
    )[0]
    assert "browser promote" in text_of(browser, "history")
    # the whole page, fleet to history, at a laptop's width
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 140)  # + the window's own frame
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    browser.set_window_size(1400, 2200)
    button.click()
    images = wait_for("the drift plots", lambda: by_css(browser, "#drift-detail img"))
    assert len(images) == 5
    assert all(i.get_attribute("src").startswith("data:image/png") for i in images)


def test_the_page_works_from_the_keyboard(bento: Any, browser: Any) -> None:
    """Every control has a label; Tab reaches the action form, letters pick options and Enter
    submits: unpin beta without the mouse."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    unlabeled = browser.execute_script(
        "return [...document.querySelectorAll('input, select')]"
        ".filter(c => !c.labels || !c.labels.length).map(c => c.id)"
    )
    assert unlabeled == []
    browser.execute_script("document.getElementById('admin-key').focus()")
    keys = ActionChains(browser)
    for _ in range(40):
        if browser.switch_to.active_element.get_attribute("id") == "act-kind":
            break
        keys.send_keys(Keys.TAB).perform()
    else:
        raise AssertionError("Tab never reached the action form")
    keys.send_keys("u").perform()  # "Unpin"
    assert browser.switch_to.active_element.get_attribute("value") == "unpin"
    keys.send_keys(Keys.TAB, "b").perform()  # adapter: beta
    assert browser.switch_to.active_element.get_attribute("value") == "beta"
    keys.send_keys(Keys.TAB).perform()  # alias, version and weight are hidden for unpin
    assert browser.switch_to.active_element.get_attribute("id") == "act-reason"
    keys.send_keys("unpinned from the keyboard", Keys.ENTER).perform()
    wait_for("the unpin's answer", lambda: text_of(browser, "action-result").startswith("Done"))
    assert bento.admin("/admin/residency").json()["pinned"] == []
    last = events(bento, "beta")[-1]
    assert (last.action, last.reason) == ("adapter.unpin", "unpinned from the keyboard")


def test_an_unreachable_server_is_shown_and_the_page_recovers(bento: Any, browser: Any) -> None:
    browser.set_network_conditions(offline=True, latency=0, throughput=0)
    try:
        wait_for("the unreachable error", lambda: "Server unreachable" in text_of(browser, "error"))
        assert "last update" in text_of(browser, "status")
    finally:
        browser.delete_network_conditions()
    wait_for("the page to recover", lambda: "Live" in text_of(browser, "status"))
    assert not by_css(browser, "#error:not([hidden])")
    assert console_errors(browser) == [] or all(
        "Failed to fetch" in e or "ERR_INTERNET_DISCONNECTED" in e for e in console_errors(browser)
    )
