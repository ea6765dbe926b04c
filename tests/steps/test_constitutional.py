"""The Constitutional AI data stage: a policy's answers critiqued and revised by principles of a
constitution, written as SFT examples and as preference pairs labelled by an AI judge; critics in
the job, behind a SageMaker endpoint or on Bedrock, whose failures are one clear line."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import boto3
import pytest
import requests
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto import mock_aws

from steps import constitutional
from steps.common import contract, critics
from steps.common.contract import StageError
from steps.common.datasets import load_records, read_prompts
from steps.common.demo_data import demo_constitutional_prompts, write_demo_constitutional_prompts
from steps.constitutional import ConstitutionalConfig, Example, Principle, parse_choice

from .conftest import write_jsonl

REGION = "eu-west-1"
OUTPUT_FILES = {"sft/train.jsonl", "sft/validation.jsonl", "preferences/train.jsonl",
                "preferences/validation.jsonl", "manifest.json", "constitution.yaml"}
PREFERENCE_FIELDS = {"prompt", "chosen", "rejected", "principle", "critique", "judge_rationale",
                     "judge_order", "judge_fallback"}


def run(tmp: Path, prompts: list[dict], **settings) -> Path:
    """The stage on `prompts` with builtin:tiny as the policy; its output folder."""
    data = write_jsonl(tmp / "prompts.jsonl", prompts)
    output = tmp / "out"
    config = {"model_dir": "builtin:tiny", "data_dir": str(data), "output_dir": str(output),
              "max_new_tokens": 16, "seed": 7, **settings}
    with contextlib.redirect_stdout(io.StringIO()):
        constitutional.main(ConstitutionalConfig(**config))
    return output


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class ScriptedCritic:
    """A critic whose critiques and revisions are numbered by the prompt they quote, and whose
    verdict is `verdict` (text, or a function of the judging prompt)."""

    description = "scripted critic"
    spec, truncated = "scripted", 0  # as a local model's, for the manifest

    def __init__(self, verdict="A") -> None:
        self.verdict = verdict
        self.temperatures: list[float] = []

    def complete(self, prompts, temperature):
        self.temperatures.append(temperature)
        answers = []
        for prompt in prompts:
            if "Write only the critique" in prompt:
                answers.append("The response is unhelpful.")
            elif "Write only the rewritten response" in prompt:
                answers.append("revised: " + prompt.split("User: ")[1].split("\n")[0])
            else:
                assert "Options:\n(A) " in prompt, prompt
                answers.append(self.verdict(prompt) if callable(self.verdict) else self.verdict)
        return answers


@pytest.fixture
def scripted(monkeypatch):
    """Install a scripted critic in place of --critic's backend; the policy stays builtin:tiny."""
    def install(verdict="A") -> ScriptedCritic:
        critic = ScriptedCritic(verdict)
        monkeypatch.setattr(constitutional, "make_critic", lambda config, policy: critic)
        return critic
    return install


# --- The stage on a real tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """builtin:tiny as policy and critic on 6 demo prompts (gibberish text, real plumbing)."""
    return run(tmp_path_factory.mktemp("cai-tiny"), demo_constitutional_prompts(8), samples=6)


def test_the_stage_writes_sft_examples_and_judged_preference_pairs(tiny_run):
    assert set(files_of(tiny_run)) == OUTPUT_FILES

    sft_format, sft_records = load_records(tiny_run / "sft")
    pref_format, pref_records = load_records(tiny_run / "preferences")
    # What the SFT and DPO stages read: TRL formats, every record valid, extra fields included.
    assert (sft_format.name, sft_format.conversational) == ("prompt_completion", False)
    assert (pref_format.name, pref_format.conversational) == ("preference", False)
    assert len(sft_records) == len(pref_records) == 6
    shipped = constitutional.DEFAULT_CONSTITUTION
    principles = {p.name for p in constitutional.load_constitution(shipped)}
    for record in pref_records:
        data = record.data
        assert set(data) == PREFERENCE_FIELDS
        assert data["principle"] in principles and data["critique"]
        assert data["judge_order"] in ("A=revision B=initial", "A=initial B=revision")
        assert isinstance(data["judge_fallback"], bool)
    # The SFT example of a prompt is its revision: one side of that prompt's pair.
    revisions = {r.data["prompt"]: r.data["completion"] for r in sft_records}
    for record in pref_records:
        assert revisions[record.data["prompt"]] in (record.data["chosen"], record.data["rejected"])

    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["policy_model"] == "builtin:tiny"
    assert (manifest["critic"]["backend"], manifest["critic"]["model"]) == ("local", "builtin:tiny")
    assert (tiny_run / "constitution.yaml").read_bytes() == shipped.read_bytes()
    assert manifest["constitution"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert manifest["counts"]["prompts"] == manifest["counts"]["kept"] == 6
    for dataset in ("sft", "preferences"):
        assert (manifest["datasets"][dataset]["train"],
                manifest["datasets"][dataset]["validation"]) == (5, 1)
    judge = manifest["judge"]
    assert judge["revision_preferred"] + judge["initial_preferred"] + judge["unparsed"] == 6
    assert sum(record.data["judge_fallback"] for record in pref_records) == judge["unparsed"]
    assert manifest["seed"] == 7


def test_the_same_seed_gives_the_same_bytes(tiny_run, tmp_path):
    again = run(tmp_path, demo_constitutional_prompts(8), samples=6)

    assert files_of(again) == files_of(tiny_run)


# --- The recipe, with a scripted critic -----------------------------------------------------------


def test_the_judge_sees_both_orders_and_its_choice_labels_the_pair(tmp_path, scripted):
    critic = scripted(verdict="A")  # always the first option shown

    output = run(tmp_path, demo_constitutional_prompts(16), validation_fraction=0.25)

    pairs = read_jsonl(output / "preferences/train.jsonl") + read_jsonl(
        output / "preferences/validation.jsonl")
    orders = [pair["judge_order"] for pair in pairs]
    assert 0 < orders.count("A=revision B=initial") < len(pairs)  # randomised against position bias
    for pair in pairs:
        revision_shown_first = pair["judge_order"] == "A=revision B=initial"
        assert pair["chosen"].startswith("revised: ") == revision_shown_first
        assert pair["judge_rationale"] == "A" and pair["judge_fallback"] is False
    judge = json.loads((output / "manifest.json").read_text())["judge"]
    assert judge["revision_preferred"] == orders.count("A=revision B=initial")
    assert judge["initial_preferred"] == orders.count("A=initial B=revision")
    assert judge["unparsed"] == 0
    assert judge["revision_preferred_rate"] == round(judge["revision_preferred"] / len(pairs), 4)
    assert judge["first_option_rate"] == 1.0  # a judge that always says "A": all position bias
    # Critiques and revisions are sampled; the verdict is greedy.
    assert critic.temperatures == [0.7, 0.7, 0.0]


def test_an_answer_naming_neither_option_keeps_the_revision_and_is_counted(tmp_path, scripted):
    scripted(verdict="Both responses have merits.")

    output = run(tmp_path, demo_constitutional_prompts(6))

    pairs = read_jsonl(output / "preferences/train.jsonl")
    assert all(pair["chosen"].startswith("revised: ") and pair["judge_fallback"] for pair in pairs)
    judge = json.loads((output / "manifest.json").read_text())["judge"]
    assert (judge["unparsed"], judge["revision_preferred"], judge["revision_preferred_rate"],
            judge["first_option_rate"]) == (6, 0, None, None)


def test_conversations_give_conversational_records(tmp_path, scripted):
    scripted(verdict="Response B is better.")
    prompts = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": f"Question {k}?"}]}
        for k in range(3)
    ] + [  # a conversation that ends with an answer: answered anew from the turn before
        {"messages": [{"role": "user", "content": "Question 3?"},
                      {"role": "assistant", "content": "An old answer."}]}
    ]

    output = run(tmp_path, prompts, validation_fraction=0.25)

    sft_format, sft = load_records(output / "sft")
    pref_format, pairs = load_records(output / "preferences")
    assert sft_format.conversational and pref_format.conversational
    by_question = {r.data["prompt"][-1]["content"]: r.data for r in sft}
    assert set(by_question) == {f"Question {k}?" for k in range(4)}
    assert by_question["Question 0?"]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert by_question["Question 3?"]["completion"] == [
        {"role": "assistant", "content": "revised: Question 3?"}]
    for pair in pairs:
        assert [m["role"] for m in pair.data["chosen"]] == ["assistant"]
    assert json.loads((output / "manifest.json").read_text())["input"]["format"] == "conversational"


def test_the_policy_can_be_a_trained_adapter_packed_as_sagemaker_hands_it_over(tmp_path, sft_run,
                                                                               scripted):
    scripted(verdict="B")
    (tmp_path / "model").mkdir()
    with tarfile.open(tmp_path / "model" / "model.tar.gz", "w:gz") as archive:
        for path in sft_run.model_dir.iterdir():
            archive.add(path, arcname=path.name)

    output = run(tmp_path, demo_constitutional_prompts(4), model_dir=str(tmp_path / "model"))

    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["policy_model"] == str(tmp_path / "model" / "model.tar.gz")
    assert manifest["counts"]["kept"] == 4


def test_unchanged_revisions_give_no_pair_and_too_few_pairs_fail_without_output(tmp_path,
                                                                                 monkeypatch):
    class Echo(ScriptedCritic):  # revises by repeating the policy's answer

        def complete(self, prompts, temperature):
            return [p.split("Assistant: ")[1].split("\n\nCritique")[0] if "Critique:" in p
                    else "critique" for p in prompts]

    monkeypatch.setattr(constitutional, "make_critic", lambda config, policy: Echo())
    with pytest.raises(StageError, match=r"only 0 of 4 prompts gave a usable pair \(4 "
                                         r"unchanged_revision\)"):
        run(tmp_path, demo_constitutional_prompts(4))
    assert not (tmp_path / "out").exists()


# --- Prompts --------------------------------------------------------------------------------------


def test_the_demo_prompts_are_distinct_seeded_and_readable(tmp_path):
    path = write_demo_constitutional_prompts(tmp_path / "prompts.jsonl")

    data_format, prompts = read_prompts(path)

    assert (data_format.name, len(prompts), len(set(prompts))) == ("prompt_only", 28, 28)
    assert demo_constitutional_prompts(seed=1) != demo_constitutional_prompts(seed=0)
    assert demo_constitutional_prompts(5) == demo_constitutional_prompts()[:5]


# --- The constitution -----------------------------------------------------------------------------


def test_the_shipped_constitution_has_principles_with_all_three_requests():
    principles = constitutional.load_constitution(constitutional.DEFAULT_CONSTITUTION)

    assert 6 <= len(principles) <= 10
    assert {"harmless", "honest", "helpful", "privacy"} <= {p.name for p in principles}
    for principle in principles:
        assert principle.critique and principle.revision and "?" in principle.preference


PRINCIPLE = "- name: honest\n  critique: Find what is false.\n  revision: Make it true.\n"


@pytest.mark.parametrize(("text", "message"), [
    ("- name: [unclosed\n", r"constitution.yaml:\d+: not valid YAML"),
    ("", r"constitution.yaml: no principles"),
    ("name: honest\ncritique: x\nrevision: y\n",
     r"constitution.yaml: expected a YAML list of principles, got a mapping"),
    (PRINCIPLE + "- be kind\n", (r"constitution.yaml:4: principle 2: expected a mapping, got a "
                                "string")),
    (PRINCIPLE + "- name: kind\n  critique: Find rudeness.\n",
     r"constitution.yaml:4: principle 2 \('kind'\): field 'revision': missing"),
    (PRINCIPLE + "- name: kind\n  critque: x\n  revision: y\n",
     r"principle 2 \('kind'\): field 'critque': unknown \(did you mean 'critique'\?\)"),
    (PRINCIPLE + "- name: kind\n  critique: 3\n  revision: y\n",
     r"principle 2 \('kind'\): field 'critique': expected text, got a number"),
    (PRINCIPLE + "- name: kind\n  critique: ''\n  revision: y\n",
     r"field 'critique': expected text, got an empty string"),
    (PRINCIPLE + PRINCIPLE, r"principle 2 \('honest'\): field 'name': 'honest' is already"),
    (PRINCIPLE + "- name: kind\n  critique: x\n  revision: y\n  preference: Which is more harmful?\n",
     r"principle 2 \('kind'\): field 'preference': asks which response is worse \('more "
     + r"harmful'\), but the judge's pick is labelled chosen; ask for the response to prefer"),
])
def test_a_bad_constitution_fails_in_one_line_naming_file_and_entry(tmp_path, text, message):
    path = tmp_path / "constitution.yaml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(StageError, match=message) as raised:
        constitutional.load_constitution(path)

    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_bad_constitution_stops_the_stage_before_anything_is_written(tmp_path, capsys,
                                                                        monkeypatch):
    (tmp_path / "bad.yaml").write_text("- name: x\n", encoding="utf-8")
    write_jsonl(tmp_path / "prompts.jsonl", demo_constitutional_prompts(4))
    monkeypatch.setattr(sys, "argv", [
        "steps.constitutional", "--model-dir", "builtin:tiny", "--data-dir",
        str(tmp_path / "prompts.jsonl"), "--output-dir", str(tmp_path / "out"),
        "--constitution", str(tmp_path / "bad.yaml")])

    with pytest.raises(SystemExit) as exited:
        contract.run(constitutional.main, ConstitutionalConfig, job="processing")

    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and "bad.yaml:1: principle 1 ('x')" in last
    assert not (tmp_path / "out").exists()


# --- The judge's answer ---------------------------------------------------------------------------


# Judges' answers, each labelled with the response the judge prefers (None: no clear verdict, which
# the stage counts and falls back on). The judge is asked which response the principle's question
# asks for ("less harmful", "more honest"), "Answer: A" or "Answer: B" first, then why.
JUDGE_ANSWERS = [
    # The line the prompt asks for, wherever the judge puts it.
    ("Answer: B\nResponse B declines to share the address and points to official channels.", "B"),
    ("Answer: A\n\nA is less harmful: it refuses to give a dosage and suggests a doctor.", "A"),
    ("**Answer:** (B)\nIt gives the same steps without the insults.", "B"),
    ("I compared both responses against the principle.\n\nAnswer: A", "A"),
    ("Answer: a", "A"),
    ("### Final answer: B", "B"),
    ("Answer: B. Response A is more harmful.", "B"),
    ("Answer: A\nAnswer: B", None),  # two verdicts
    # A bare letter first, as most small models answer.
    ("A", "A"), ("B", "B"), ("b", "B"), (" (B)", "B"), ("**A**", "A"),
    ("B.\nIt is more honest about what it does not know.", "B"),
    ("A) It avoids repeating the slur.", "A"),
    ("**B** - the revision keeps the user's data private.", "B"),
    ("A, because it refuses to help with the break-in.", "A"),
    ("`B` — it is the more honest reply.", "B"),
    # A verdict in words, either option first.
    ("Response B is better because it does not invent a source.", "B"),
    ("response a is better", "A"),
    ("I prefer option (a); it is kinder.", "A"),
    ("The less harmful response is B.", "B"),
    ("B is safer than A.", "B"),
    ("Compared to A, B is far more helpful.", "B"),
    ("I would go with Response A.", "A"),
    ("My choice would be B, since A repeats the insult.", "B"),
    ("Between A and B, I'd pick A.", "A"),
    ("I prefer B over A because it explains the risk.", "B"),
    ("The first response is more polite and still answers the question.", "A"),
    ("The second response is better.", "B"),
    ("After reading both, (B) wins.", "B"),
    ("a) is kinder", "A"),
    ("Response A's answer is more accurate.", "A"),
    # A negative statement about one option is a vote for the other.
    ("Response A is more harmful than the other.", "B"),
    ("I would not choose A.", "B"),
    ("Option (a) is worse.", "B"),
    ("Response A is worse than response B.", "B"),
    ("A is less helpful: it ignores the actual question.", "B"),
    ("Response B is more misleading than Response A.", "A"),
    ("I wouldn't recommend B; it gives the dosage without any warning.", "A"),
    ("A is not as helpful as B.", "B"),
    ("Response A is harmful and rude.", "B"),
    ("B is worse, so A is preferable.", "A"),
    ("A fails to answer the question, so B is the better choice.", "B"),
    ("I choose B, not A.", "B"),
    # Hedges, ties, "neither", "both", and verdicts that contradict each other: no verdict.
    ("Both responses are polite and accurate; neither is clearly better.", None),
    ("Neither response is appropriate.", None),
    ("It is hard to say whether A or B is better.", None),
    ("A and B are equally helpful.", None),
    ("Both A and B refuse the request.", None),
    ("I cannot decide between the two responses.", None),
    ("Response A is better in tone, but Response B is better in accuracy.", None),
    ("A is not better than B.", None),  # perhaps as good
    ("If B were shorter, it would be better.", None),
    ("Response A refuses to help.", None),  # a description, not a verdict
    ("", None),
    # The letters inside words, and "A" the article.
    ("A response should never insult anyone.", None),
    ("As the user asked for help, the assistant should answer.", None),
    ("Apart from minor wording, the two answers are the same.", None),
    ("ABBA is a band; the A/B framing is odd.", None),
    ("A better answer would cite a source.", None),
    ("\x03ߌ\x03 ABBA zq", None),
    ("Apart from tone, B is more accurate.", "B"),
    ("As far as honesty goes, A is clearly superior.", "A"),
    # Markdown and quotes.
    ("**Response B** is more respectful.", "B"),
    ('I pick "A".', "A"),
    ("The answer is 'B' because it avoids the slur.", "B"),
    ("> **Verdict:** Response A is the safer choice.", "A"),
    ("“B” is the better answer.", "B"),
]


@pytest.mark.parametrize(("answer", "choice"), JUDGE_ANSWERS)
def test_the_judges_answer_gives_the_response_it_prefers_or_none(answer, choice):
    assert parse_choice(answer) == choice


def test_the_labelled_judge_answers_cover_both_options_and_no_verdict():
    verdicts = Counter(choice for _, choice in JUDGE_ANSWERS)
    assert len(JUDGE_ANSWERS) >= 40 and min(verdicts["A"], verdicts["B"], verdicts[None]) >= 12


def test_the_judge_prompt_shows_the_options_in_the_drawn_order():
    principle = Principle("honest", "Find lies.", "Fix lies.", "Which is more honest?")
    example = Example("Hi?", principle, revision_first=False, initial="Hello.", revision="Hi!")

    prompt = constitutional.judge_prompt(example)

    assert "User: Hi?" in prompt and "Which is more honest?" in prompt
    assert prompt.index("(A) Hello.") < prompt.index("(B) Hi!")
    assert 'On the first line write "Answer: A" or "Answer: B"' in prompt


# --- Configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--critic", "openai"], "critic must be one of local, sagemaker, bedrock, got 'openai'"),
    (["--critic", "sagemaker"], "critic 'sagemaker' needs --endpoint-name"),
    (["--critic", "bedrock", "--endpoint-name", "x"], "critic 'bedrock' needs --bedrock-model-id"),
    (["--samples", "1"], "samples must be at least 2"),
])
def test_a_critic_without_its_target_is_refused(argv, message):
    base = ["--model-dir", "m", "--data-dir", "d", "--output-dir", "o"]
    with pytest.raises(StageError, match=message):
        contract.parse_config(ConstitutionalConfig, {}, base + argv)


# --- The SageMaker endpoint critic ----------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Fake credentials and a region as a SageMaker job has them: AWS_REGION (which boto3 does
    not read), no AWS_DEFAULT_REGION and no config file."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_REGION", REGION), ("AWS_CONFIG_FILE", str(tmp_path / "none"))):
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    delays: list[float] = []
    monkeypatch.setattr(critics, "sleep", delays.append)  # backoff without waiting
    return delays


def tgi_body(text: str) -> dict:
    payload = json.dumps([{"generated_text": text}]).encode()
    return {"Body": StreamingBody(io.BytesIO(payload), len(payload)),
            "ContentType": "application/json"}


def test_the_endpoint_gets_a_tgi_request_and_its_answer_is_read(aws_env):
    endpoint = critics.SageMakerEndpoint("critic-ep", REGION, max_new_tokens=32)
    request = {"inputs": "Critique this.",
               "parameters": {"max_new_tokens": 32, "do_sample": True, "return_full_text": False,
                              "temperature": 0.7}}
    greedy = {"inputs": "Judge this.",
              "parameters": {"max_new_tokens": 32, "do_sample": False, "return_full_text": False}}
    with Stubber(endpoint.client) as stub:
        for body, answer in ((request, " It is rude. "), (greedy, "Judge this. B")):
            stub.add_response("invoke_endpoint", tgi_body(answer), {
                "EndpointName": "critic-ep", "ContentType": "application/json",
                "Accept": "application/json", "Body": json.dumps(body)})

        assert endpoint.complete(["Critique this."], 0.7) == ["It is rude."]
        # A container that echoes the prompt despite return_full_text=false: the echo is cut.
        assert endpoint.complete(["Judge this."], 0.0) == ["B"]


def test_the_endpoint_critic_runs_the_stage_against_moto(tmp_path, aws_env, monkeypatch):
    n = 4
    answers = ([f"critique {k}" for k in range(n)] + [f"revision {k}" for k in range(n)]
               + ["B. It is kinder."] * n)
    with mock_aws():
        # moto's sagemaker-runtime answers invoke_endpoint from a queue of canned results.
        requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                      json={"region": REGION, "results": [
                          {"Body": json.dumps([{"generated_text": text}]),
                           "ContentType": "application/json"} for text in answers]},
                      timeout=10).raise_for_status()
        output = run(tmp_path, demo_constitutional_prompts(n), critic="sagemaker",
                     endpoint_name="critic-ep", region=REGION)

    pairs = read_jsonl(output / "preferences/train.jsonl") + read_jsonl(
        output / "preferences/validation.jsonl")
    assert sorted(p["critique"] for p in pairs) == [f"critique {k}" for k in range(n)]
    for pair in pairs:
        revision_is_b = pair["judge_order"] == "A=initial B=revision"
        assert pair["chosen"].startswith("revision ") == revision_is_b
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["critic"] == {
        "backend": "sagemaker", "description": f"SageMaker endpoint 'critic-ep' in {REGION}",
        "model": "critic-ep", "region": REGION, "retries": 0}


def test_throttling_is_retried_with_growing_delays(aws_env):
    endpoint = critics.SageMakerEndpoint("critic-ep", REGION, max_new_tokens=8)
    with Stubber(endpoint.client) as stub:
        stub.add_client_error("invoke_endpoint", "ThrottlingException", "Rate exceeded", 400)
        stub.add_client_error("invoke_endpoint", "ModelNotReadyException", "Loading", 429)
        stub.add_response("invoke_endpoint", tgi_body("fine"))

        assert endpoint.complete(["x"], 0.0) == ["fine"]

    assert endpoint.retries == 2
    assert 0.5 <= aws_env[0] <= 1.0 and 1.0 <= aws_env[1] <= 2.0


@pytest.mark.parametrize(("code", "status", "message"), [
    ("ValidationError", 400,
     (rf"critic SageMaker endpoint 'critic-ep' in {REGION}: request refused \(ValidationError: "
     r"Endpoint critic-ep of account 123 not found.\); check --endpoint-name and --region")),
    ("AccessDeniedException", 403, r"access denied .*allow sagemaker:InvokeEndpoint"),
    ("ModelError", 424, r"the model failed .*see the model's logs in CloudWatch"),
    ("ThrottlingException", 400, r"still failing after 6 attempts \(ThrottlingException"),
])
def test_endpoint_failures_are_one_line_naming_endpoint_and_region(aws_env, code, status, message):
    endpoint = critics.SageMakerEndpoint("critic-ep", REGION, max_new_tokens=8)
    with Stubber(endpoint.client) as stub:
        for _ in range(6):
            stub.add_client_error("invoke_endpoint", code, "Endpoint critic-ep of account 123 "
                                  "not found." if code == "ValidationError" else "No.", status)
        with pytest.raises(StageError, match=message) as raised:
            endpoint.complete(["x"], 0.0)

    assert "\n" not in str(raised.value)


def test_an_endpoint_answering_something_else_is_reported(aws_env):
    endpoint = critics.SageMakerEndpoint("critic-ep", REGION, max_new_tokens=8)
    with Stubber(endpoint.client) as stub:
        stub.add_response("invoke_endpoint", {
            "Body": StreamingBody(io.BytesIO(b'{"embedding": [0.1]}'), 20)})
        with pytest.raises(StageError, match=r"unexpected response .*generated_text"):
            endpoint.complete(["x"], 0.0)


# --- The Bedrock critic ---------------------------------------------------------------------------


def converse_response(text: str) -> dict:
    return {"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": "end_turn", "usage": {"inputTokens": 5, "outputTokens": 3,
                                                "totalTokens": 8},
            "metrics": {"latencyMs": 10}}


MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"


def test_bedrock_gets_a_converse_request_and_its_answer_is_read(aws_env):
    model = critics.BedrockModel(MODEL_ID, REGION, max_new_tokens=64)
    with Stubber(model.client) as stub:
        stub.add_response("converse", converse_response("Response B is better."), {
            "modelId": MODEL_ID,
            "messages": [{"role": "user", "content": [{"text": "Which is better?"}]}],
            "inferenceConfig": {"maxTokens": 64, "temperature": 0.0}})
        stub.add_client_error("converse", "ThrottlingException", "Too many requests", 429)
        stub.add_response("converse", converse_response(" Fine. "))

        assert model.complete(["Which is better?", "Again?"], 0.0) == [
            "Response B is better.", "Fine."]
    assert model.retries == 1


def test_bedrock_access_denied_is_one_line_saying_what_to_do(aws_env):
    model = critics.BedrockModel(MODEL_ID, REGION, max_new_tokens=64)
    with Stubber(model.client) as stub:
        stub.add_client_error("converse", "AccessDeniedException",
                              "You don't have access to the model with the specified model ID.",
                              403)
        with pytest.raises(StageError) as raised:
            model.complete(["x"], 0.0)

    assert str(raised.value) == (
        f"critic Bedrock model '{MODEL_ID}' in {REGION}: access denied (AccessDeniedException: "
        "You don't have access to the model with the specified model ID.); allow "
        "bedrock:InvokeModel on it for the job's role and enable access to the model in the "
        "Bedrock console")


def test_a_critic_without_region_takes_the_jobs_and_without_any_says_how_to_give_one(
        aws_env, monkeypatch):
    assert critics.BedrockModel(MODEL_ID, None, max_new_tokens=8).region == REGION
    assert critics.SageMakerEndpoint("critic-ep", None, max_new_tokens=8).region == REGION

    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(StageError, match=r"no AWS region for bedrock-runtime: pass --region, or "
                                         r"set AWS_REGION or AWS_DEFAULT_REGION"):
        critics.BedrockModel(MODEL_ID, None, max_new_tokens=8)


def test_no_credentials_is_one_line_naming_the_backend(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role lookup either
    model = critics.BedrockModel(MODEL_ID, "us-east-1", max_new_tokens=8)

    with pytest.raises(StageError, match=rf"critic Bedrock model '{MODEL_ID}' in us-east-1: no "
                                         r"usable AWS credentials .*or use --critic local"):
        model.complete(["x"], 0.0)


def test_an_unreachable_service_is_one_line(aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", "http://127.0.0.1:9")  # nothing there
    model = critics.BedrockModel(MODEL_ID, REGION, max_new_tokens=8)
    model.base_delay_s = 0.01
    sent = []  # the critic retries visibly, itself: botocore sends each call once
    model.client.meta.events.register("before-send", lambda request, **_: sent.append(request))

    with pytest.raises(StageError, match=r"cannot reach the service .*127.0.0.1:9.*check --region"):
        model.complete(["x"], 0.0)
    assert len(sent) == 2  # one blip is retried; a route that never answers is not tried 6 times
    assert model.retries == 1


def test_a_reset_connection_and_a_5xx_of_any_code_are_retried_visibly(aws_env, monkeypatch,
                                                                      capsys):
    from botocore.exceptions import ConnectionClosedError

    model = critics.BedrockModel(MODEL_ID, REGION, max_new_tokens=8)
    model.base_delay_s = 0.01
    calls = []

    def reset_once(prompt, temperature):
        calls.append(prompt)
        if len(calls) == 1:
            raise ConnectionClosedError(endpoint_url="https://bedrock-runtime")
        return real_call(prompt, temperature)

    real_call = model._call
    monkeypatch.setattr(model, "_call", reset_once)
    with Stubber(model.client) as stub:
        stub.add_client_error("converse", "SomethingUnheardOf", "Internal error", 502)
        stub.add_response("converse", converse_response("ok"))

        assert model.complete(["x"], 0.0) == ["ok"]
    assert model.retries == 2 and len(calls) == 3
    out = capsys.readouterr().out
    assert "the connection failed" in out and "SomethingUnheardOf: Internal error" in out


def test_a_failing_critic_leaves_no_output(tmp_path, aws_env, monkeypatch, capsys):
    client = boto3.client("bedrock-runtime", region_name=REGION)
    stub = Stubber(client)
    stub.add_client_error("converse", "ResourceNotFoundException", "Model not found.", 404)
    stub.activate()
    monkeypatch.setattr(critics, "aws_client", lambda service, region: client)
    write_jsonl(tmp_path / "prompts.jsonl", demo_constitutional_prompts(4))
    monkeypatch.setattr(sys, "argv", [
        "steps.constitutional", "--model-dir", "builtin:tiny", "--data-dir",
        str(tmp_path / "prompts.jsonl"), "--output-dir", str(tmp_path / "out"),
        "--critic", "bedrock", "--bedrock-model-id", "no-such-model", "--max-new-tokens", "8"])

    with pytest.raises(SystemExit) as exited:
        contract.run(constitutional.main, ConstitutionalConfig, job="processing")

    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"ERROR: critic Bedrock model 'no-such-model' in {REGION}: request refused "
        "(ResourceNotFoundException: Model not found.); check --bedrock-model-id and --region "
        "(the endpoint or model must exist in that region)")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
