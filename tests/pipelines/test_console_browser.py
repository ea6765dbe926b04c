"""The web console in a real browser: Debian's chromium, driven by Playwright.

Screenshots of every page the tests reach go to test-output/console/ (printed at the end of
each test). A missing chromium fails the tests in CI and skips them elsewhere
(tests/external.py); `make install` installs it where it can.

The local server executes what the page starts (pipelines/local/sagemaker_api.py), as SageMaker
would: the end-to-end test starts a tiny sft execution from the page and watches it finish.
"""

import contextlib
import http.server
import json
import re
import socket
import threading

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.external import ROOT, require_program
from tests.pipelines.console_setup import (
    BUCKET,
    package,
    quick_pipeline,
    serving,
    sft_pipeline,
    upsert_sft,
)

SCREENSHOTS = ROOT / "test-output" / "console"
# The flags a headless chromium needs in a container, and none that reaches the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
EXECUTION_MINUTES = 15


@pytest.fixture(scope="module")
def browser():
    chromium = require_program("chromium", "Debian's chromium browser (make install)")

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def bucket(clients):
    clients[1].create_bucket(Bucket=BUCKET)
    return BUCKET


@pytest.fixture(scope="module")
def console(clients, local_home, bucket):
    with serving(clients[0].meta.endpoint_url, local_home) as served:
        yield served


@pytest.fixture
def page(browser, console, request):
    """A page of a fresh browser profile that opened the console's printed URL."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"{console.url}?token={console.token}")
    opened.wait_for_selector("#target:not(:empty)")
    yield opened
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / f"{request.node.name}.png"
    opened.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    context.close()
    assert not errors, f"the page's scripts failed: {errors}"


def snap(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    print(f"screenshot: {SCREENSHOTS / name}.png")


def package_row(page, arn: str):
    return page.locator(f'tr:has(input[aria-label="choose {arn}"])')


def finish(page, timeout_ms: int) -> None:
    """Wait until the execution on the page ends; it must have succeeded."""
    badge = page.locator("h2 .badge")
    expect(badge).to_have_text(re.compile("Succeeded|Failed|Stopped"), timeout=timeout_ms)
    failure = page.locator("section p.failure")
    assert badge.text_content() == "Succeeded", failure.all_text_contents()


def status_of(sagemaker, arn: str) -> tuple[str, str]:
    described = sagemaker.describe_model_package(ModelPackageName=arn)
    return described["ModelApprovalStatus"], described.get("ApprovalDescription", "")


# -- what works on today's local server ------------------------------------------------------

def test_the_page_lists_pipelines_and_draws_a_pipeline_dag(page, clients, recipe_definitions):
    name = sft_pipeline(clients[0], recipe_definitions)

    page.goto(page.url.split("#")[0] + "#/pipelines")
    page.get_by_role("link", name=name).click()

    nodes = page.locator("svg.dag g.node")
    expect(nodes).to_have_count(7)
    assert nodes.evaluate_all("nodes => nodes.map(n => n.dataset.step)") == [
        "DataPrep", "SFT", "Evaluate", "CompareWithApproved", "EvaluationGate", "Register",
        "EvaluationGateFailed"]
    expect(page.locator("svg.dag text.branch")).to_have_text(["true", "false"])
    expect(page.locator('form.parameters input[name="BaseModel"]')).to_have_value(
        "builtin:smollm2-135m-instruct")


def test_a_package_is_approved_from_the_page_with_its_reason(page, clients):
    sagemaker, s3 = clients
    arn = package(sagemaker, s3, {"perplexity": 11.0})

    page.goto(page.url.split("#")[0] + "#/packages")
    package_row(page, arn).locator("td").nth(1).click()
    page.fill('section.package input[name="reason"]', "held-out perplexity 11 beats v1")
    page.get_by_role("button", name="Approve").click()

    expect(page.locator("#message.done")).to_contain_text("Approved")
    expect(package_row(page, arn).locator(".badge")).to_have_text("Approved")
    assert status_of(sagemaker, arn) == ("Approved", "held-out perplexity 11 beats v1")


def test_an_approval_without_a_reason_is_refused_on_one_line_and_changes_nothing(page, clients):
    sagemaker, s3 = clients
    arn = package(sagemaker, s3, {"perplexity": 11.0})

    page.goto(page.url.split("#")[0] + "#/packages")
    package_row(page, arn).locator("td").nth(1).click()
    page.get_by_role("button", name="Reject").click()

    expect(page.locator("#message.error")).to_have_text(
        "say why the package is rejected: the reason is kept as its approval description")
    assert status_of(sagemaker, arn) == ("PendingManualApproval", "")


def test_two_packages_are_compared_from_the_page(page, clients):
    sagemaker, s3 = clients
    older = package(sagemaker, s3, {"perplexity": 12.0})
    newer = package(sagemaker, s3, {"perplexity": 9.5}, code_version="newer")

    page.goto(page.url.split("#")[0] + "#/packages")
    package_row(page, older).locator("input[type=checkbox]").check()
    package_row(page, newer).locator("input[type=checkbox]").check()
    page.get_by_role("button", name="Compare the two chosen").click()

    row = page.locator("section.comparison tr", has_text="metric.perplexity")
    expect(row.locator("td")).to_have_text(["metric.perplexity", "12", "9.5", "-2.500"])
    expect(page.locator("section.comparison tr", has_text="metadata.code_version")).to_be_visible()


def test_a_page_of_another_origin_cannot_approve_start_or_promote(page, console, clients, capsys):
    """The user's browser holds the console's cookie; another site's page open in it tries
    every way a page can send a request to the console, and nothing changes."""
    sagemaker, s3 = clients
    name = quick_pipeline(sagemaker)
    arn = package(sagemaker, s3, {"perplexity": 11.0})
    executions = len(sagemaker.list_pipeline_executions(PipelineName=name)[
        "PipelineExecutionSummaries"])
    api = f"http://127.0.0.1:{console.port}/api"
    attack = f"""<!doctype html><title>cat pictures</title>
<iframe name="sink"></iframe>
<form id="form" method="post" enctype="text/plain" target="sink" action="{api}/approval">
<input name='{{"arn": "{arn}", "status": "Approved", "reason": "x", "pad": "' value='"}}'>
</form>
<script>
const approve = JSON.stringify({{arn: "{arn}", status: "Approved", reason: "forged"}});
Promise.allSettled([
  fetch("{api}/approval", {{method: "POST", mode: "no-cors", credentials: "include", body: approve}}),
  fetch("{api}/approval", {{method: "POST", credentials: "include", body: approve,
        headers: {{"Content-Type": "application/json", "X-Console-Token": "guess"}}}}),
  fetch("{api}/start", {{method: "POST", mode: "no-cors", credentials: "include",
        body: JSON.stringify({{pipeline: "{name}", parameters: {{}}}})}}),
  fetch("{api}/promote", {{method: "POST", mode: "no-cors", credentials: "include",
        body: JSON.stringify({{arn: "{arn}", group: "llm-stolen"}})}}),
]).then(() => {{ document.getElementById("form").submit(); document.title = "sent"; }});
</script>"""
    with attacker_site(attack) as site:
        evil = page.context.new_page()
        # The form's POST, sent last, is a navigation of the sink frame: its answer is the end.
        with evil.expect_response(lambda answer: answer.url == f"{api}/approval"
                                  and answer.request.is_navigation_request()):
            evil.goto(site)
        evil.wait_for_function("document.title === 'sent'")
        snap(evil, "attacker-page")

    refusals = capsys.readouterr().err
    assert status_of(sagemaker, arn) == ("PendingManualApproval", "")
    assert len(sagemaker.list_pipeline_executions(PipelineName=name)[
        "PipelineExecutionSummaries"]) == executions
    groups = [g["ModelPackageGroupName"] for g in
              sagemaker.list_model_package_groups()["ModelPackageGroupSummaryList"]]
    assert "llm-stolen" not in groups
    # the requests reached the console and were refused for their origin
    assert refusals.count(f"refused: a request from another origin ({site.rstrip('/')})") >= 4


def test_an_unreachable_endpoint_is_one_line_on_the_page(browser, local_home):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{free.getsockname()[1]}"
    with serving(dead, local_home) as console:
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{console.url}?token={console.token}")
        error = page.locator("#message.error")
        expect(error).to_contain_text(f"cannot reach {dead}/")
        snap(page, "unreachable-endpoint")
        text = error.text_content()
        context.close()

    assert "\n" not in text and "Traceback" not in text and "llm-pipeline server status" in text


# -- an execution the local server runs ------------------------------------------------------

@pytest.mark.e2e
def test_an_execution_started_from_the_page_finishes_reruns_from_a_step_and_is_approved(
        page, clients, local_home, tmp_path):
    sagemaker, s3 = clients
    name = upsert_sft(local_home)
    records = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."}
               for a in range(6) for b in range(6)]
    s3.put_object(Bucket=BUCKET, Key="console/sums.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in records).encode())
    group = "llm-console-e2e"
    wait = EXECUTION_MINUTES * 60_000

    page.goto(page.url.split("#")[0] + "#/pipelines")
    page.get_by_role("link", name=name).click()
    for parameter, value in {"BaseModel": "builtin:tiny", "InputData": f"s3://{BUCKET}/console/sums.jsonl",
                             "ModelPackageGroup": group, "LearningRate": "0.005",
                             "EvalThreshold": "1.0"}.items():
        page.fill(f'form.parameters input[name="{parameter}"]', value)
    page.get_by_role("button", name="Start").click()
    page.wait_for_url("**/#/execution/*")
    first = page.url

    # it is watched while it runs: statuses come from ListPipelineExecutionSteps (the page
    # shows its error line in the same update as the execution's status)
    expect(page.locator("h2 .badge")).to_be_visible()
    expect(page.locator("#message.error")).to_be_hidden()
    expect(page.locator("svg.dag g.node.status-Executing, svg.dag g.node.status-Succeeded")
           .first).to_be_visible(timeout=60_000)
    finish(page, wait)
    for step in ("DataPrep", "SFT", "Evaluate", "CompareWithApproved", "EvaluationGate",
                 "Register"):
        expect(page.locator(f'svg.dag g.node[data-step="{step}"]')).to_have_class(
            "node status-Succeeded")
    snap(page, "execution-succeeded")
    page.locator('svg.dag g.node[data-step="SFT"]').click()
    expect(page.locator("svg.curve polyline")).not_to_have_count(0)
    expect(page.locator("pre.log")).not_to_be_empty()
    snap(page, "step-sft")
    page.locator('svg.dag g.node[data-step="Evaluate"]').click()
    expect(page.frame_locator("iframe.report").locator("h1")).to_have_text("Evaluation report")

    # re-run from Evaluate: a selective execution reusing DataPrep and SFT
    page.get_by_role("button", name="Re-run from Evaluate").click()
    page.wait_for_url(lambda url: "#/execution/" in url and url != first)
    finish(page, wait)
    expect(page.locator("tr", has_text="SFT").locator("td").nth(4)).to_contain_text("reused")
    snap(page, "rerun-succeeded")

    # and its package approved, with the reason
    page.goto(page.url.split("#")[0] + "#/packages")
    newest = page.locator("tr", has_text=group).first
    newest.locator("td").nth(1).click()
    page.fill('section.package input[name="reason"]', "reviewed the report")
    page.get_by_role("button", name="Approve").click()
    expect(page.locator("#message.done")).to_contain_text("Approved")
    arns = [p["ModelPackageArn"] for p in sagemaker.list_model_packages(
        ModelPackageGroupName=group)["ModelPackageSummaryList"]]
    assert ("Approved", "reviewed the report") in [status_of(sagemaker, a) for a in arns]


# -- the other site ---------------------------------------------------------------------------

@contextlib.contextmanager
def attacker_site(html: str):
    """Another web site, on another port of 127.0.0.1, serving `html`; yields its URL."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    # Polling for shutdown() every 0.05 s, not every 0.5 s (serve_forever's default).
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
