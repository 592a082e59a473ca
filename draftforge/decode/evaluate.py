"""Acceptance length and speed of a draft on a prompt set: ``draftforge eval`` (``bench``'s
sweep over draft shapes is :mod:`draftforge.decode.sweep`).

Acceptance length (AL) is tokens emitted per target verification forward, the bonus or
correction token included (docs/architecture.md); the prefill's first token is not a verification.
``accept_rate_per_position[d]`` is conditional: of the rounds whose walk reached a node at
depth d that has drafted children, the share that accepted one of them (so AL is about
1 + sum_d prod_{j<=d} rate_j, the training-time estimate, when every node has children).
Speed is compared with the same engine with drafting off (one token per target forward through
the same code) and with transformers' ``generate``. The engine's target path (lean or
transformers', :mod:`draftforge.decode.paths`) is logged once, with why when the lean forward
could not serve the target, and its cost model (:mod:`draftforge.decode.costs`) is measured
and logged before the prompts run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from draftforge.data.conversation import RowError
from draftforge.decode.costs import DecodeCosts, measure_costs
from draftforge.decode.engine import Generation, SpecEngine
from draftforge.decode.errors import DecodeError
from draftforge.decode.image_prompts import (
    builtin_image_prompts,
    check_images,
    encode_image_prompt,
    has_images,
    image_row_messages,
)
from draftforge.decode.sampling import SamplingParams
from draftforge.decode.tree import TreeShape
from draftforge.decode.vision import ImageInputs, generate_inputs
from draftforge.models.eagle3 import Eagle3Draft
from draftforge.target import Target

BUILTIN_PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "eval_prompts.jsonl"
WARMUP_TOKENS = 4  # a short first generation so one-time costs stay out of the timings

Log = Callable[[str], None]


@dataclass
class Prompt:
    """One evaluation prompt: chat messages ending with a user turn (content parts with
    images for a vision-language target); ``where``: its file:line, or "built-in"."""

    id: str
    messages: list[dict[str, Any]]
    where: str = "built-in"


def _row_messages(row: dict[str, Any], where: str, folder: Path) -> list[dict[str, Any]]:
    if has_images(row):  # content parts or a LLaVA row: images checked here, paths made absolute
        try:
            row = {"messages": image_row_messages(row, folder)}
            check_images(row["messages"])
        except RowError as err:
            raise DecodeError(f"{where}: {err.detail}") from None
    if "messages" in row:
        messages = [dict(m) for m in row["messages"]]
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()  # the answer is what we generate
        if not messages or messages[-1].get("role") != "user":
            raise DecodeError(f"{where}: `messages` must contain a user turn to answer")
        return messages
    if "turns" in row:  # MT-Bench style: the first turn is the prompt
        turns = row["turns"]
        if not turns or not isinstance(turns[0], str):
            raise DecodeError(f"{where}: `turns` must be a non-empty list of strings")
        return [{"role": "user", "content": turns[0]}]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise DecodeError(
        f"{where}: expected a `messages`, `turns` or `prompt` field, got {sorted(row)}"
    )


def load_prompts(path: str | Path | None = None, *, images: bool = False) -> list[Prompt]:
    """Prompts from a JSONL file (default: the built-in set; ``images``: the built-in image
    prompts). Each row holds chat ``messages`` (content parts may hold images),
    MT-Bench ``turns`` (first turn used), a plain ``prompt``, or is a LLaVA row (``image``
    and ``conversations``); image paths are relative to the file."""
    if path is None and images:
        return [Prompt(id=ident, messages=messages) for ident, messages in builtin_image_prompts()]
    path = Path(path) if path is not None else BUILTIN_PROMPTS
    prompts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DecodeError(
                f"{where}: not UTF-8 text (byte {err.start + 1} of the line); save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DecodeError(f"{where}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise DecodeError(f"{where}: each line must be a JSON object")
        ident = row.get("id", row.get("question_id", number))
        messages = _row_messages(row, where, path.parent)
        prompts.append(Prompt(id=str(ident), messages=messages, where=where))
    if not prompts:
        raise DecodeError(f"{path} holds no prompts: one JSON object per line is expected")
    return prompts


def encode(target: Target, prompt: Prompt) -> list[int]:
    """The prompt through the target's chat template, ready for the assistant's answer."""
    tokenizer = target.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise DecodeError(
            f"the tokenizer of {target.path} has no chat template: use an instruct target"
        )
    encoded = tokenizer.apply_chat_template(
        prompt.messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def encode_prompt(target: Target, prompt: Prompt) -> tuple[list[int], ImageInputs | None]:
    """A prompt's ids and, for a vision-language target, its image inputs (None without
    images); a prompt with images for a text-only target, or a bad image, names the prompt."""
    if target.processor is None:
        if has_images({"messages": prompt.messages}):
            raise DecodeError(
                f"{prompt.where}: prompt {prompt.id} has images and {target.path} is not a "
                "vision-language target"
            )
        return encode(target, prompt), None
    try:
        return encode_image_prompt(target.processor, prompt.messages)
    except RowError as err:
        raise DecodeError(f"{prompt.where}: prompt {prompt.id}: {err.detail}") from None


def fit_prompt(ids: list[int], max_positions: int, max_new_tokens: int) -> list[int]:
    """Drop tokens from the left so the prompt and its answer fit the target's positions
    (at least one prompt token is kept)."""
    room = max(1, max_positions - max_new_tokens)
    return ids[-room:]


@dataclass
class Totals:
    """Sums over a prompt set for one way of decoding."""

    tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    sequences: int = 0
    rounds: int = 0
    verified: int = 0
    drafted: int = 0
    attempts: list[int] = field(default_factory=list)
    accepts: list[int] = field(default_factory=list)

    def add(self, gen: Generation) -> None:
        self.tokens += len(gen.tokens)
        self.seconds += gen.seconds
        self.prefill_seconds += gen.prefill_seconds
        self.sequences += 1
        self.rounds += gen.rounds
        self.verified += gen.verified
        self.drafted += gen.drafted
        if not self.attempts:
            self.attempts = [0] * len(gen.attempts)
            self.accepts = [0] * len(gen.accepts)
        for d, (tried, took) in enumerate(zip(gen.attempts, gen.accepts, strict=True)):
            self.attempts[d] += tried
            self.accepts[d] += took

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens/s after each sequence's first token: the decoding phase alone, without the
        prefill that comes before it (the same work with or without a draft)."""
        seconds = self.seconds - self.prefill_seconds
        return (self.tokens - self.sequences) / seconds if seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
        }
        if self.rounds:
            out["verify_forwards"] = self.rounds
            out["acceptance_length"] = self.verified / self.rounds
            out["drafted_per_round"] = self.drafted / self.rounds
            out["accept_rate_per_position"] = [
                took / tried if tried else None
                for tried, took in zip(self.attempts, self.accepts, strict=True)
            ]
        return out


def hf_generate(
    target: Target,
    ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    stop_ids: frozenset[int],
    images: ImageInputs | None = None,
) -> tuple[list[int], float]:
    """transformers' own generate with the same sampling settings (and the prompt's
    ``images`` for a vision-language target): new tokens and seconds."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not sampling.greedy,
        temperature=sampling.temperature if not sampling.greedy else None,
        top_p=sampling.top_p if not sampling.greedy else None,
        top_k=sampling.top_k if not sampling.greedy else None,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=min(stop_ids) if stop_ids else 0,
    )
    inputs = torch.tensor([ids], device=target.device)
    start = time.perf_counter()
    with torch.no_grad(), generate_inputs(target.model, images) as image_kwargs:
        out = target.model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            generation_config=config,
            **image_kwargs,
        )
    return out[0, len(ids) :].tolist(), time.perf_counter() - start


def time_generate(
    target: Target,
    encoded: Sequence[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_ids: frozenset[int] = frozenset(),
) -> Totals:
    """transformers' ``generate`` (greedy by default) over the given prompt ids, after a short
    warm-up generation: the reference the engine's speed is reported against."""
    sampling = sampling or SamplingParams()
    hf_generate(target, encoded[0], WARMUP_TOKENS, sampling, stop_ids)
    totals = Totals()
    for ids in encoded:
        tokens, seconds = hf_generate(target, ids, max_new_tokens, sampling, stop_ids)
        totals.tokens += len(tokens)
        totals.seconds += seconds
    return totals


MATMUL_NAMES = {"skinny": "few-row kernel", "onednn": "oneDNN-prepacked", None: "F.linear"}


def path_line(engine: SpecEngine) -> str:
    """Which target path the engine runs, and why not the lean one when it could not."""
    if engine.path.name == "lean":
        matmuls = MATMUL_NAMES[engine.path.matmul]
        compiled = ", compiled layers" if engine.path.compiled else ""
        return f"target path: lean static-cache forward ({matmuls} matmuls{compiled})"
    if engine.path_note:
        return f"target path: transformers' forward (the lean forward cannot run it: {engine.path_note})"
    return "target path: transformers' forward"


def encode_all(
    target: Target, prompts: Sequence[Prompt], max_positions: int, max_new_tokens: int, log: Log
) -> tuple[list[list[int]], list[ImageInputs | None], list[str]]:
    """Every prompt's token ids, fitted to the target's positions, its image inputs, and the
    ids of the prompts that were cut to fit. A prompt with images is never cut (the cut could
    fall inside an image)."""
    encoded, images, truncated = [], [], []
    for prompt in prompts:
        ids, inputs = encode_prompt(target, prompt)
        fitted = fit_prompt(ids, max_positions, max_new_tokens)
        if len(fitted) < len(ids) and inputs is not None:
            raise DecodeError(
                f"{prompt.where}: prompt {prompt.id} has {len(ids)} tokens with its images and "
                f"the target takes {max_positions} positions, {max_new_tokens} of them for "
                "the answer: lower --max-new-tokens or use smaller images"
            )
        if len(fitted) < len(ids):
            log(f"prompt {prompt.id}: {len(ids)} tokens, kept the last {len(fitted)}")
            truncated.append(prompt.id)
        encoded.append(fitted)
        images.append(inputs)
    return encoded, images, truncated


def _settings(
    shape: TreeShape, sampling: SamplingParams, max_new_tokens: int, seed: int
) -> dict[str, Any]:
    """The decoding settings as a report records them."""
    return {
        **asdict(shape),
        "num_draft_tokens": shape.draft_tokens if shape.drafting else 1,
        **asdict(sampling),
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }


def typical_context(encoded: Sequence[list[int]], max_new_tokens: int) -> int:
    """The cache length costs are measured at: the median prompt plus half the new tokens."""
    return sorted(len(ids) for ids in encoded)[len(encoded) // 2] + max_new_tokens // 2


def _log_costs(
    engine: SpecEngine, encoded: Sequence[list[int]], max_new_tokens: int, log: Log
) -> DecodeCosts:
    """The engine's cost model at a typical cache length of this run, logged line by line."""
    measured = measure_costs(engine, context=typical_context(encoded, max_new_tokens))
    for line in measured.lines():
        log(line)
    return measured


def _prompt_line(prompt: Prompt, gen: Generation, row: dict[str, Any]) -> str:
    al = "-" if gen.acceptance_length is None else f"{gen.acceptance_length:.2f}"
    return f"{prompt.id}: {len(gen.tokens)} tokens, AL {al}, {row['tokens_per_s']:.1f} tok/s"


def _prompt_row(prompt: Prompt, ids: list[int], gen: Generation) -> dict[str, Any]:
    return {
        "id": prompt.id,
        "prompt_tokens": len(ids),
        "new_tokens": len(gen.tokens),
        "verify_forwards": gen.rounds,
        "acceptance_length": gen.acceptance_length,
        "tokens_per_s": round(len(gen.tokens) / gen.seconds, 3),
        "stop": gen.stop,
    }


def evaluate(
    target: Target,
    draft: Eagle3Draft | None,
    prompts: Sequence[Prompt],
    shape: TreeShape,
    sampling: SamplingParams,
    max_new_tokens: int = 256,
    *,
    seed: int = 0,
    baseline: bool = True,
    generate: bool = True,
    lean: bool | None = None,
    compile: bool = False,
    costs: bool = True,
    log: Log = print,
    on_prompt: Callable[[], object] = lambda: None,
) -> dict[str, Any]:
    """Run every prompt through the speculative engine (and the baselines) and report.

    ``lean``/``compile``: the engines' target path (:class:`SpecEngine`); ``costs``: measure
    and log the cost model first. ``on_prompt`` is called after each prompt (e.g. to move a
    progress bar)."""
    engine = SpecEngine(target, draft, shape, sampling, seed=seed, lean=lean, compile=compile)
    plain = SpecEngine(target, None, TreeShape(0), sampling, seed=seed, lean=lean, compile=compile)
    log(path_line(engine))
    encoded, images, truncated = encode_all(
        target, prompts, engine.max_positions, max_new_tokens, log
    )
    engine.generate(encoded[0], WARMUP_TOKENS, images=images[0])
    measured = _log_costs(engine, encoded, max_new_tokens, log) if costs else None
    if baseline:
        plain.generate(encoded[0], WARMUP_TOKENS, images=images[0])

    speculative, base, hf = Totals(), Totals(), Totals()
    matches = {"baseline": 0, "generate": 0}
    rows = []
    for prompt, ids, inputs in zip(prompts, encoded, images, strict=True):
        gen = engine.generate(ids, max_new_tokens, images=inputs)
        speculative.add(gen)
        row = _prompt_row(prompt, ids, gen)
        if baseline:
            ref = plain.generate(ids, max_new_tokens, images=inputs)
            base.add(ref)
            row["baseline_tokens_per_s"] = round(len(ref.tokens) / ref.seconds, 3)
            matches["baseline"] += ref.tokens == gen.tokens
        if generate:
            stops = engine.stop_ids
            tokens, seconds = hf_generate(target, ids, max_new_tokens, sampling, stops, inputs)
            hf.tokens += len(tokens)
            hf.seconds += seconds
            row["generate_tokens_per_s"] = round(len(tokens) / seconds, 3)
            matches["generate"] += tokens == gen.tokens
        rows.append(row)
        on_prompt()
        log(_prompt_line(prompt, gen, row))

    report: dict[str, Any] = {
        "target": target.path,
        "num_prompts": len(prompts),
        "settings": _settings(shape, sampling, max_new_tokens, seed),
        "acceptance_length": speculative.summary().get("acceptance_length"),
        "accept_rate_per_position": speculative.summary().get("accept_rate_per_position", []),
        "speculative": speculative.summary(),
        "truncated_prompts": truncated,
        "target_path": engine.path.name,
        "target_path_note": engine.path_note,
    }
    report |= {"costs": asdict(measured)} if measured is not None else {}
    ran = {"baseline": baseline, "generate": generate}
    report |= _versus(
        speculative, {k: t for k, t in (("baseline", base), ("generate", hf)) if ran[k]}
    )
    if sampling.greedy:
        # Greedy speculation must equal each reference that ran: how many prompts did.
        report["greedy_identical_prompts"] = {k: v for k, v in matches.items() if ran[k]}
    report["per_prompt"] = rows
    return report


def _versus(speculative: Totals, references: dict[str, Totals]) -> dict[str, Any]:
    """Each reference run's summary and the speculative run's speedup over it; over the
    engine without a draft (``baseline``) also for the decoding phase alone."""
    out: dict[str, Any] = {}
    for name, ref in references.items():
        out[name] = ref.summary()
        out[f"speedup_vs_{name}"] = ratio(speculative.tokens_per_s, ref.tokens_per_s)
    if "baseline" in references:
        decode = references["baseline"].decode_tokens_per_s
        out["decode_speedup_vs_baseline"] = ratio(speculative.decode_tokens_per_s, decode)
    return out


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b > 0 else None
