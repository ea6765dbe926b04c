"""Constitutional AI data (processing stage): revised responses for SFT and AI-labelled preference
pairs for DPO, from a policy, a list of principles and a critic model.

    python -m steps.constitutional --model-dir MODEL --data-dir PROMPTS --output-dir OUT
        [--constitution FILE] [--critic local|sagemaker|bedrock] [--critic-model SPEC]
        [--endpoint-name NAME] [--bedrock-model-id ID] [--region REGION]
        [--max-new-tokens 128] [--temperature 0.7] [--samples N] [--seed 42]
        [--validation-fraction 0.1] [--batch-size 8]

--model-dir is the current policy: a model or adapter folder, a model.tar.gz or a folder holding
one, or a builtin spec (builtin:tiny, builtin:smollm2-135m-instruct). --data-dir holds the prompts:
records with a `prompt` (a string or a conversation), conversations (`messages`; one that ends with
an assistant turn is answered anew from the turn before), or prompt/completion or preference
records, whose prompts are used. The constitution is a YAML list of principles (default: the one
shipped beside this file, steps/constitution.yaml). The critic is the policy itself unless
--critic-model names another local model, or --critic picks a SageMaker endpoint or a Bedrock model.

The recipe (Bai et al., "Constitutional AI: Harmlessness from AI Feedback", 2022):
  1. read and check the constitution and every prompt; drop repeated prompts, shuffle (seeded) and
     keep --samples of them;
  2. the policy answers every prompt;
  3. each prompt draws a principle (seeded); the critic critiques the answer by the principle's
     critique request, then rewrites it by its revision request;
  4. the critic, as judge, sees the initial and the revised answer in a random order (against
     position bias) and says which better follows the principle, A or B, and why; its choice
     labels the pair (an answer with no clear verdict keeps the revision as chosen, and is
     counted);
  5. write, all or nothing, with one train/validation split of the prompts shared by both datasets:

       OUT/sft/{train,validation}.jsonl          {prompt, completion}: the revised answers
       OUT/preferences/{train,validation}.jsonl  {prompt, chosen, rejected, principle, critique,
                                                  judge_rationale, judge_order, judge_fallback}
       OUT/manifest.json                         counts, constitution sha256, critic, judge rates
       OUT/constitution.yaml                     the constitution used

Prompts keep their shape: string prompts give string records, conversations give message lists,
as TRL's SFT and DPO trainers read them. A prompt whose answer or revision came back empty, or
whose revision is the answer unchanged, gives no pair and no SFT example (counted in the manifest).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from steps.common import contract
from steps.common.contract import StageError
from steps.common.critics import BedrockModel, Critic, LocalModel, Prompt, SageMakerEndpoint
from steps.common.datasets import distinct_prompts, read_prompts
from steps.common.models import SMOLLM2, TINY, resolve_model_source
from steps.constitutional_config import ConstitutionalConfig

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.yaml")
PRINCIPLE_FIELDS = ("name", "critique", "revision", "preference")
REQUIRED_FIELDS = ("name", "critique", "revision")

# The critic's three requests. The conversation is quoted inside one user message, so that every
# backend (a chat template, a raw-text endpoint, Bedrock's converse) gets the same self-contained
# text; the paper's few-shot multi-turn framing needs a base model, and these critics are
# instruction-following models.
CRITIQUE_PROMPT = """Below is a conversation between a user and an AI assistant.

{conversation}

{request}
Write only the critique, in a few sentences."""

REVISION_PROMPT = """Below is a conversation between a user and an AI assistant, followed by a \
critique of the assistant's last response.

{conversation}

Critique: {critique}

{request}
Write only the rewritten response, with no preamble."""

# The multiple-choice form of the paper's preference model prompts.
JUDGE_PROMPT = """Consider the following conversation between a user and an AI assistant:

{conversation}

{question}

Options:
(A) {first}
(B) {second}

On the first line write "Answer: A" or "Answer: B", for the response the question asks for; \
then explain your choice in one or two sentences."""




@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # the critique request
    revision: str  # the revision request
    preference: str  # the judge's question


@dataclass
class Example:
    """One prompt's way through the recipe."""

    prompt: Prompt
    principle: Principle
    revision_first: bool  # whether the judge saw the revision as (A)
    initial: str = ""
    critique: str = ""
    revision: str = ""
    judge_answer: str = ""
    choice: Literal["A", "B"] | None = None  # None: the judge's answer named neither

    @property
    def revision_preferred(self) -> bool:
        if self.choice is None:  # the fallback: keep the revision as chosen
            return True
        return (self.choice == "A") == self.revision_first

    @property
    def drop_reason(self) -> str | None:
        if not self.initial:
            return "empty_response"
        if not self.revision:
            return "empty_revision"
        if self.revision == self.initial:
            return "unchanged_revision"
        return None


def main(config: ConstitutionalConfig) -> None:
    # 1. Constitution and prompts, checked before any model loads.
    constitution_path = Path(config.constitution) if config.constitution else DEFAULT_CONSTITUTION
    principles = load_constitution(constitution_path)
    print(f"constitution {constitution_path}: {len(principles)} principles "
          f"({', '.join(p.name for p in principles)})", flush=True)
    data_format, prompts = read_prompts(Path(config.data_dir))
    unique = distinct_prompts(prompts)
    rng = random.Random(config.seed)
    rng.shuffle(unique)
    selected = unique[: config.samples]
    if len(selected) < 2:
        raise StageError(f"{config.data_dir}: {len(selected)} distinct prompt(s); a train/"
                         "validation split needs at least 2")
    print(f"prompts: {len(prompts)} {data_format.name} records, {len(unique)} distinct, using "
          f"{len(selected)} (seed {config.seed})", flush=True)

    # 2-4. The policy answers; the critic critiques, revises and judges.
    source = _model_source(config.model_dir)
    print(f"loading policy {source}", flush=True)
    policy = LocalModel(source, config.max_new_tokens, config.batch_size)
    critic = make_critic(config, policy)
    print(f"critic: {critic.description}", flush=True)
    examples = [
        Example(prompt, principle=rng.choice(principles), revision_first=rng.random() < 0.5)
        for prompt in selected
    ]
    torch.manual_seed(config.seed)  # sampled answers, critiques and revisions: seeded too
    constitutional_examples(examples, policy, critic, config.temperature)

    # 5. Split the prompts that gave a usable pair, and write.
    kept = [example for example in examples if example.drop_reason is None]
    dropped = Counter(example.drop_reason for example in examples if example.drop_reason)
    if len(kept) < 2:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items()))
        raise StageError(
            f"only {len(kept)} of {len(selected)} prompts gave a usable pair ({reasons}); give "
            "more prompts (--samples), a larger --max-new-tokens, or a stronger --critic-model"
        )
    n_validation = min(max(1, round(len(kept) * config.validation_fraction)), len(kept) - 1)
    splits = {"train": kept[n_validation:], "validation": kept[:n_validation]}
    files = {
        f"{dataset}/{split}.jsonl": _jsonl([record(example) for example in split_examples])
        for dataset, record in (("sft", sft_record), ("preferences", preference_record))
        for split, split_examples in splits.items()
    }
    manifest = _manifest(config, source, critic, constitution_path, principles, data_format.name,
                         len(prompts), len(unique), examples, kept, dropped, splits, files)
    output_dir = Path(config.output_dir)
    with contract.atomic_output(output_dir) as staging:
        for name, payload in files.items():
            (staging / name).parent.mkdir(exist_ok=True)
            (staging / name).write_bytes(payload)
        (staging / "constitution.yaml").write_bytes(constitution_path.read_bytes())
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                               encoding="utf-8")
    judge = manifest["judge"]
    print(f"wrote {len(kept)} SFT examples and preference pairs ({len(splits['train'])} train, "
          f"{n_validation} validation) to {output_dir}; the judge preferred the revision "
          f"{judge['revision_preferred']} times, the initial answer {judge['initial_preferred']} "
          f"times, {judge['unparsed']} answers unparsed", flush=True)


def constitutional_examples(
    examples: list[Example], policy: LocalModel, critic: Critic, temperature: float
) -> None:
    """Fill each example: the policy's answer, the critique, the revision and the judge's verdict.

    One phase at a time over all prompts, so a local model generates in batches.
    """
    print(f"policy: answering {len(examples)} prompts", flush=True)
    answers = policy.complete([example.prompt for example in examples], temperature)
    for example, answer in zip(examples, answers, strict=True):
        example.initial = answer

    print("critic: critiques", flush=True)
    critiques = critic.complete([critique_prompt(example) for example in examples], temperature)
    for example, critique in zip(examples, critiques, strict=True):
        example.critique = critique

    print("critic: revisions", flush=True)
    revisions = critic.complete([revision_prompt(example) for example in examples], temperature)
    for example, revision in zip(examples, revisions, strict=True):
        example.revision = revision

    # Greedy: the label of a pair should not be a coin toss.
    print("critic: judging", flush=True)
    verdicts = critic.complete([judge_prompt(example) for example in examples], 0.0)
    for example, verdict in zip(examples, verdicts, strict=True):
        example.judge_answer = verdict
        example.choice = parse_choice(verdict)


def make_critic(config: ConstitutionalConfig, policy: LocalModel) -> Critic:
    """The backend --critic names; a local critic that is the policy's model is the policy."""
    if config.critic == "sagemaker":
        return SageMakerEndpoint(config.endpoint_name, config.region, config.max_new_tokens)
    if config.critic == "bedrock":
        return BedrockModel(config.bedrock_model_id, config.region, config.max_new_tokens)
    spec = _model_source(config.critic_model) if config.critic_model else policy.spec
    if spec == policy.spec:
        return policy
    print(f"loading critic {spec}", flush=True)
    return LocalModel(spec, config.max_new_tokens, config.batch_size)


# --- The constitution -----------------------------------------------------------------------------


def load_constitution(path: Path) -> list[Principle]:
    """The principles of a constitution file, every entry checked; errors name file, line, field."""
    path = Path(path)
    advice = "each principle needs name, critique and revision (see steps/constitution.yaml)"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StageError(f"constitution {path} does not exist; pass --constitution FILE or leave "
                         "it out for the shipped one") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StageError(f"constitution {path}: cannot read it ({err})") from None
    try:
        # The node tree gives each entry's line; safe_load gives the values.
        tree, entries = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise StageError(f"{where}: not valid YAML ({problem}); write a YAML list of "
                         "principles") from None
    if entries is None or entries == []:
        raise StageError(f"{path}: no principles; {advice}")
    if not isinstance(entries, list):
        raise StageError(f"{path}: expected a YAML list of principles, got "
                         f"{_kind(entries)}; {advice}")
    principles: list[Principle] = []
    for index, (entry, node) in enumerate(zip(entries, tree.value), start=1):
        where = f"{path}:{node.start_mark.line + 1}: principle {index}"
        if not isinstance(entry, dict):
            raise StageError(f"{where}: expected a mapping, got {_kind(entry)}; {advice}")
        if isinstance(entry.get("name"), str) and entry["name"].strip():
            where += f" ('{entry['name']}')"
        for key in entry:
            if key not in PRINCIPLE_FIELDS:
                close = difflib.get_close_matches(str(key), PRINCIPLE_FIELDS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise StageError(f"{where}: field '{key}': unknown{hint}; fields: "
                                 f"{', '.join(PRINCIPLE_FIELDS)}")
        for key in PRINCIPLE_FIELDS:
            if key not in entry:
                if key in REQUIRED_FIELDS:
                    raise StageError(f"{where}: field '{key}': missing; {advice}")
                continue
            value = entry[key]
            if not isinstance(value, str) or not value.strip():
                got = "an empty string" if isinstance(value, str) else _kind(value)
                raise StageError(f"{where}: field '{key}': expected text, got {got}")
        if _ASKS_FOR_THE_WORSE.search(entry.get("preference") or ""):
            raise StageError(
                f"{where}: field 'preference': asks which response is worse "
                f"('{_ASKS_FOR_THE_WORSE.search(entry['preference']).group(0)}'), but the judge's "
                "pick is labelled chosen; ask for the response to prefer, e.g. 'less harmful'"
            )
        name = " ".join(entry["name"].split())
        if any(p.name == name for p in principles):
            raise StageError(f"{where}: field 'name': '{name}' is already the name of an earlier "
                             "principle; names must be unique")
        principles.append(Principle(
            name=name,
            critique=entry["critique"].strip(),
            revision=entry["revision"].strip(),
            preference=(entry.get("preference") or
                        f"Which of these assistant responses better follows the principle "
                        f"'{name}'?").strip(),
        ))
    return principles


# --- Models ---------------------------------------------------------------------------------------


def _model_source(spec: str) -> str:
    """A model spec as a stage is given it: builtin, a folder or archive (resolved as a model
    channel is), or anything else for load_model to try (a hub id)."""
    if spec in (TINY, SMOLLM2) or not Path(spec).exists():
        return spec
    return resolve_model_source(Path(spec), spec)


# --- The critic's requests and the judge's answer -------------------------------------------------


def conversation_text(prompt: Prompt, response: str | None = None) -> str:
    """The conversation as plain text, "User: ..." / "Assistant: ...", for the critic to read."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if response is not None:
        turns.append({"role": "assistant", "content": response})
    return "\n\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in turns)


def critique_prompt(example: Example) -> str:
    return CRITIQUE_PROMPT.format(
        conversation=conversation_text(example.prompt, example.initial),
        request=example.principle.critique,
    )


def revision_prompt(example: Example) -> str:
    return REVISION_PROMPT.format(
        conversation=conversation_text(example.prompt, example.initial),
        critique=example.critique,
        request=example.principle.revision,
    )


def judge_prompt(example: Example) -> str:
    first, second = ((example.revision, example.initial) if example.revision_first
                     else (example.initial, example.revision))
    return JUDGE_PROMPT.format(
        conversation=conversation_text(example.prompt),
        question=example.principle.preference,
        first=first,
        second=second,
    )


# --- How a judge's answer is read -----------------------------------------------------------------
# JUDGE_PROMPT asks for "Answer: A" or "Answer: B" first; small models often answer otherwise ("B.",
# "Response A is more harmful than the other", "I would not choose A"). parse_choice reads such
# answers clause by clause: a mention of an option ("Response B", "(a)", "the first response", a
# capital A or B standing alone) with what is said of it there. What is said of an option counts
# for it ("is better", "less harmful", "I prefer") or for the other one ("is worse", "more
# harmful", "I would not choose"); a clause that hedges ("neither", "equally", "whether", "hard to
# say") counts for nothing. The principle's question asks for the response to prefer (checked when
# the constitution is read), so "better" means preferred. An answer whose clauses disagree or say
# nothing of either option has no verdict: None, which the stage counts and falls back on.

_GOOD = (r"good|helpful|honest|accurate|appropriate|polite|ethical|respectful|harmless|useful|"
         r"informative|clear|relevant|responsible|careful|truthful|considerate|safe|kind|concise|"
         r"complete|correct|thoughtful|balanced|empathetic|friendly|wise|cautious|private|direct")
_BAD = (r"harm(?!less)\w*|toxic|danger\w*|offensive|rude|mislead\w*|bias\w*|unethical|"
        r"inappropriate|problematic|risky|unsafe|hurtful|deceptive|evasive|vague|sexist|racist|"
        r"illegal|false|inaccurate|wrong|incorrect|confusing|unhelpful|dishonest|insulting|"
        r"aggressive|invasive|irresponsible|concerning|troubling")
# Words after a capital "A" that make it the letter ("A is ...") rather than the article ("A
# response ...").
_AFTER_LETTER = (r"is|are|was|seems|appears|would|does|did|has|had|gives|provides|offers|contains|"
                 r"refuses|answers|avoids|fails|wins|clearly|also|because|since|and|or|than|over|"
                 r"remains|violates|follows|respects|could|should|might|may|can|will|shows|states|"
                 r"includes|addresses|falls|reads|sounds|looks|stays|explains|only|still|though")
_LETTER = (r"(?<![\w/\-'’])(?:([Aa])(?!\s+(?!(?:" + _AFTER_LETTER + r")\b)[a-z])|([Bb]))"
           r"(?:'s)?(?![\w/\-'’])")  # "A" before a noun is the article: "A response ..."
# A letter that opens the answer and is not the subject of what follows: "A) It avoids ...",
# "B - the revision ...", "A, because ...", "B because ...".
_LEADING = re.compile(r"\s*\(?([AaBb])(?:[).:,]|\s+[-—–]|(?=\s+(?:because|since)\b))"
                      r"(?!\s*(?:is|was|seems|appears|would|does|has|gives|provides|contains|"
                      r"fails)\b)")
_MENTION = re.compile(
    r"(?:\b(?:response|option|answer|assistant|reply|output|candidate)\s*[#:]?\s*\(?"
    + _LETTER + r"\)?|\(([AaBb])\)|" + _LETTER
    + r"|\b(?:the\s+)?(first|former|second|latter)(?:\s+(?:response|option|one|answer|reply))?"
    r"(?=\s+(?:response|option|one|answer|reply|is|was|seems)\b))",
)
_OPTION_WORD = re.compile(r"\b(?:response|option|answer)\b", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"[.!?;]+(?=\s|$)|\n")
_CLAUSE_BREAK = re.compile(r",?\s+\b(?:but|however|although|though|whereas|while|because|since|"
                           r"so|therefore|thus|hence|yet|and)\b", re.IGNORECASE)
_HEDGE = re.compile(
    r"\b(?:neither|either|equally|equal|tie|tied|same|similar|unsure|unclear|whether|depends|if|"
    r"unless|not\s+sure|no\s+clear|(?:hard|difficult|impossible)\s+to|(?:can\s*not|can't|unable"
    r"\s+to)\s+(?:decide|determine|tell|say|choose|pick))\b",
    re.IGNORECASE,
)
_NEGATION = re.compile(r"\b(?:not(?!\s+only)|never|no(?!\s+(?:doubt|question)))\b|n't\b",
                       re.IGNORECASE)
# What is said of an option: (pattern, +1 for it or -1 for the other, whether a negation before
# it turns the vote to the other option rather than making it unclear).
_CUES = [
    (rf"\bnot\s+as\s+(?:{_GOOD})\s+as\b", -1, False),
    (rf"\bnot\s+as\s+(?:{_BAD})\s+as\b", +1, False),
    (rf"\b(?:more|most)\s+(?:{_GOOD})\b|\b(?:less|least)\s+(?:{_BAD})\b", +1, False),
    (rf"\b(?:more|most)\s+(?:{_BAD})\b|\b(?:less|least)\s+(?:{_GOOD})\b", -1, False),
    (r"\b(?:better|best|superior|preferable|preferred|safer|safest|kinder|clearer|wiser)\b", +1,
     False),
    (r"\b(?:worse|worst|inferior|weaker|poorer)\b", -1, False),
    (r"\b(?:prefer|choose|chose|pick|select|recommend|favou?r|go(?:ing)?\s+with|opt\s+for|wins)\b",
     +1, True),
    (r"\b(?:vote\s+for|side\s+with|lean\w*\s+towards?|(?:would|I'd)\s+say)\b", +1, True),
    (r"\b(?:answer|verdict|choice|pick|winner|preference)\s*(?:is|would\s+be|:)", +1, True),
    (r"\b(?:reject|fails|falls\s+short|violates)\b", -1, True),
]
# A plain judgement ("A is harmful", "B is helpful") counts only when no comparison does.
_PLAIN_CUES = [(rf"\b(?:is|was|seems|appears|sounds)\s+(?:\w+ly\s+)?(?:{_GOOD})\b", +1),
               (rf"\b(?:is|was|seems|appears|sounds)\s+(?:\w+ly\s+)?(?:{_BAD})\b", -1)]
# A preference question that asks for the response to reject ("Which is more harmful?").
_ASKS_FOR_THE_WORSE = re.compile(rf"\b(?:more|most)\s+(?:{_BAD})\b|\b(?:less|least)\s+(?:{_GOOD})\b"
                                 r"|\b(?:worse|worst)\b", re.IGNORECASE)
_CUE_PATTERNS = [(re.compile(p, re.IGNORECASE), sign, flips) for p, sign, flips in _CUES]
_PLAIN_PATTERNS = [(re.compile(p, re.IGNORECASE), sign) for p, sign in _PLAIN_CUES]
_ANSWER_LINE = re.compile(
    r"^[#>\s]*(?:(?:final\s+)?(?:answer|verdict|choice)\s*:\s*)?\(?([AaBb])\)?[.!]?\s*$",
    re.MULTILINE | re.IGNORECASE,
)


def parse_choice(answer: str) -> Literal["A", "B"] | None:
    """The response a judge's answer prefers, or None when it gives no clear verdict.

    First the line the judge prompt asks for ("Answer: B"; markdown, brackets and a lone letter
    too); else every clause's vote (see above) when all of them agree, comparisons and choices
    first, plain judgements ("A is harmful") only when there are none.
    """
    text = re.sub(r"[*_`“”\"]", "", answer).replace("‘", "'").replace("’", "'")
    text = re.sub(r"'([AaBb])'", r"\1", text)
    lines = {match.group(1).upper() for match in _ANSWER_LINE.finditer(text)}
    if lines:
        return lines.pop() if len(lines) == 1 else None
    leading = _LEADING.match(text)
    votes = {leading.group(1).upper()} if leading else set()
    plain: set[str] = set()
    for sentence in _SENTENCE_BREAK.split(_without_side_mentions(text)):
        for clause in _CLAUSE_BREAK.split(sentence):
            if _HEDGE.search(clause):
                continue
            for letter, window in _mentions(clause, whole_sentence=clause == sentence):
                vote, plain_vote = _vote(window)
                other = "B" if letter == "A" else "A"
                if vote:
                    votes.add(letter if vote > 0 else other)
                elif plain_vote:
                    plain.add(letter if plain_vote > 0 else other)
    decided = votes or plain
    return decided.pop() if len(decided) == 1 else None


def _without_side_mentions(text: str) -> str:
    """The text without mentions that are no clause's subject: "A and B", "between A or B",
    "better than B", "over A", "B, not A", "compared to A"."""
    mention = _MENTION.pattern
    text = re.sub(rf"(?:{mention})\s*,?\s*(?:and|or|nor|&|vs\.?|versus)\s+(?:{mention})",
                  " them ", text)
    text = re.sub(rf"\b(than|over|versus|vs\.?|against|unlike|instead\s+of|compared\s+(?:to|with)"
                  rf")\s+(?:{mention})", r"\1 the other", text, flags=re.IGNORECASE)
    text = re.sub(rf"(\b(?:prefer\w*|superior|inferior)\b[^.;\n]*?\bto)\s+(?:{mention})",
                  r"\1 the other", text, flags=re.IGNORECASE)
    return re.sub(rf",\s*not\s+(?:{mention})", " ", text)


def _mentions(clause: str, whole_sentence: bool) -> list[tuple[str, str]]:
    """Each option a clause mentions, with what is said around it: from the previous mention's
    last comma (or the clause's start) to the next mention's first comma (or the clause's end).
    A sentence that is a mention alone ("Option B.") says it is the choice."""
    found = list(_MENTION.finditer(clause))
    result = []
    for k, match in enumerate(found):
        name = next(group for group in match.groups() if group).lower()
        letter = "A" if name in ("a", "first", "former") else "B"
        before = clause[found[k - 1].end():match.start()] if k else clause[:match.start()]
        if k:  # the words before the previous mention's last comma are said of that one
            before = before.rsplit(",", 1)[-1] if "," in before else ""
        end = found[k + 1].start() if k + 1 < len(found) else len(clause)
        after = clause[match.end():end]
        if k + 1 < len(found):
            after = after.split(",", 1)[0]
        window = f"{before} @ {after}"
        alone = not re.search(r"[^\W_@]", _OPTION_WORD.sub("", window))
        if whole_sentence and alone:
            window = "@ wins"  # "Option B." names the choice
        result.append((letter, window))
    return result


def _vote(window: str) -> tuple[int, int]:
    """What a mention's window says of it: a comparison or choice (+1 for, -1 against, 0 none or
    unclear) and a plain judgement, each read with the negations before it."""
    vote = 0
    for pattern, sign, flips in _CUE_PATTERNS:
        for cue in pattern.finditer(window):
            negated = bool(_NEGATION.search(window, 0, cue.start()))
            if negated and not flips:
                return 0, 0  # "A is not better than B": perhaps as good
            cue_vote = -sign if negated else sign
            if vote and cue_vote != vote:
                return 0, 0
            vote = cue_vote
            window = window[:cue.start()] + " " * (cue.end() - cue.start()) + window[cue.end():]
    plain = 0
    for pattern, sign in _PLAIN_PATTERNS:
        for cue in pattern.finditer(window):
            if not _NEGATION.search(window, 0, cue.start()):
                plain = sign if plain in (0, sign) else 2
    return vote, (plain if plain != 2 else 0)


# --- Records and the manifest ---------------------------------------------------------------------


def sft_record(example: Example) -> dict[str, Any]:
    """The revised answer as an SFT example, in the prompt's shape."""
    return {"prompt": example.prompt, "completion": _response(example, example.revision)}


def preference_record(example: Example) -> dict[str, Any]:
    """The pair as the judge labelled it, with what it was judged by and why."""
    chosen, rejected = ((example.revision, example.initial) if example.revision_preferred
                        else (example.initial, example.revision))
    return {
        "prompt": example.prompt,
        "chosen": _response(example, chosen),
        "rejected": _response(example, rejected),
        "principle": example.principle.name,
        "critique": example.critique,
        "judge_rationale": example.judge_answer,
        # The rationale speaks of A and B: which was which.
        "judge_order": "A=revision B=initial" if example.revision_first
                       else "A=initial B=revision",
        "judge_fallback": example.choice is None,
    }


def _response(example: Example, text: str) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(example.prompt, list) else text


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _manifest(config: ConstitutionalConfig, source: str, critic: Critic, constitution_path: Path,
              principles: list[Principle], input_format: str, records_read: int,
              distinct_prompts: int, examples: list[Example], kept: list[Example],
              dropped: Counter, splits: dict[str, list[Example]],
              files: dict[str, bytes]) -> dict[str, Any]:
    revision_wins = sum(1 for e in kept if e.choice is not None and e.revision_preferred)
    initial_wins = sum(1 for e in kept if e.choice is not None and not e.revision_preferred)
    first_picked = sum(1 for e in kept if e.choice == "A")
    conversational = isinstance(kept[0].prompt, list)
    outputs = {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()}
    datasets = {}
    for dataset, fmt in (("sft", "prompt_completion"), ("preferences", "preference")):
        lines = "".join(f"{name} {outputs[name]}\n" for name in sorted(outputs)
                        if name.startswith(f"{dataset}/"))
        datasets[dataset] = {
            "format": fmt,
            "conversational": conversational,
            "train": len(splits["train"]),
            "validation": len(splits["validation"]),
            # As DataPrep's: the sha256 of the sorted "<file> <sha256>" lines.
            "dataset_sha256": hashlib.sha256(lines.encode()).hexdigest(),
        }
    critic_info: dict[str, Any] = {"backend": config.critic, "description": critic.description}
    if config.critic == "local":
        critic_info.update(model=critic.spec, truncated_prompts=critic.truncated)
    else:
        critic_info.update(
            model=config.endpoint_name if config.critic == "sagemaker" else config.bedrock_model_id,
            region=critic.region, retries=critic.retries,
        )
    return {
        "policy_model": source,
        "critic": critic_info,
        "constitution": {
            "file": constitution_path.name,
            "sha256": hashlib.sha256(constitution_path.read_bytes()).hexdigest(),
            "principles": [p.name for p in principles],
        },
        "input": {"format": input_format, "records_read": records_read,
                  "distinct_prompts": distinct_prompts},
        "counts": {
            "prompts": len(examples),
            "kept": len(kept),
            "dropped": dict(sorted(dropped.items())),
            "principles": dict(sorted(Counter(e.principle.name for e in kept).items())),
        },
        "judge": {
            "revision_preferred": revision_wins,
            "initial_preferred": initial_wins,
            "unparsed": len(kept) - revision_wins - initial_wins,
            "fallback": "an unparsed answer keeps the revision as chosen",
            # Rates over the verdicts that named an option. Position bias shows as a share of
            # first-option picks far from 0.5 (the order is random): a judge to distrust.
            "revision_preferred_rate": _rate(revision_wins, revision_wins + initial_wins),
            "first_option_rate": _rate(first_picked, revision_wins + initial_wins),
        },
        "datasets": datasets,
        "outputs": outputs,
        "seed": config.seed,
        "samples": config.samples,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "validation_fraction": config.validation_fraction,
    }


def _rate(count: int, total: int) -> float | None:
    return round(count / total, 4) if total else None


def _kind(value: Any) -> str:
    names = {str: "a string", list: "a list", dict: "a mapping", bool: "a boolean",
             int: "a number", float: "a number"}
    return "nothing" if value is None else names.get(type(value), type(value).__name__)


if __name__ == "__main__":
    contract.run(main, ConstitutionalConfig, job="processing")
