"""Token masks from constraints, per replica: llguidance with the model's tokenizer.

Contract:

- ``Grammars`` (one per model replica) wraps the tokenizer once and compiles each distinct
  ``Constraint`` (``batchgen.spec.constraints``) once; each row gets a ``RowMatcher``, a cheap
  copy of the compiled matcher.
- ``Matchers`` holds one decoder run's rows: ``bitmask`` gives the allowed tokens as int32 words
  (bit j of word w = token 32*w + j, llguidance's layout), ``apply_bitmask`` applies them on the
  device, ``advance`` feeds the sampled tokens back.

The end-of-sequence token is allowed exactly where the constraint may end, and is the only token
allowed once it must end (or after an error), so a constrained row stops by itself.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchgen.spec.constraints import CACHE_SIZE, Constraint, ConstraintError, describe

if TYPE_CHECKING:
    import torch

@dataclass
class GrammarStats:
    """Cumulative, for benchmarks. ``masks``: row masks llguidance computed; ``mask_seconds``:
    wall time of ``Matchers.bitmask`` (all rows of a step, and the copy to the device)."""

    compiles: int = 0
    compile_seconds: float = 0.0
    masks: int = 0
    mask_seconds: float = 0.0


class Grammars:
    """One per engine (model replica): the llguidance tokenizer built once from the HF tokenizer,
    and each distinct Constraint compiled once (cache keyed by ``Constraint.grammar``).

    ``vocab_size`` is the model's logits width (may exceed ``len(tokenizer)``: the extra ids are
    never allowed); ``eos_id`` is allowed exactly where a constraint may end."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int | None):
        import llguidance.hf

        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens; pass the model's logits width")
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.hf_tokenizer = tokenizer
        self.words = math.ceil(vocab_size / 32)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                      eos_token=eos_id)
        self.executor = llguidance.LLExecutor()
        self.stats = GrammarStats()
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def _template(self, constraint: Constraint):
        template = self._compiled.get(constraint.grammar)
        if template is not None:
            self._compiled.move_to_end(constraint.grammar)
            return template
        from llguidance import LLMatcher

        start = time.perf_counter()
        template = LLMatcher(self.tokenizer, constraint.grammar, log_level=0)
        self.stats.compile_seconds += time.perf_counter() - start
        self.stats.compiles += 1
        if template.is_error():
            raise ConstraintError(f"{constraint.kind}: cannot compile: "
                                  f"{describe(template.get_error())}")
        self._compiled[constraint.grammar] = template
        if len(self._compiled) > CACHE_SIZE:
            self._compiled.popitem(last=False)
        return template

    def compile(self, constraint: Constraint) -> None:
        """Compile ``constraint`` now (cached); raises ConstraintError if this tokenizer cannot
        serve it (a grammar naming a token the vocabulary lacks)."""
        self._template(constraint)

    def matcher(self, constraint: Constraint, gate: str | None = None,
                prompt: tuple[int, ...] = ()) -> RowMatcher:
        """A fresh matcher for one row; with ``gate`` (a reasoning model's end-of-thinking
        marker, as text), inactive until the row's text shows it, or active at once if the
        ``prompt``'s text (its tokens) already ends with it, whitespace aside: the chat template
        closed the thinking itself (Qwen 3 with ``enable_thinking: false`` ends ``</think>\\n\\n``).
        The same rule as ``responses.split_reasoning``, which splits the text at the marker."""
        if gate and prompt:
            tail = self._decode(prompt[-(len(gate) + TAIL_SLACK):])
            if tail.rstrip().endswith(gate):
                gate = None
        return RowMatcher(self._template(constraint), gate or None, self.words, self._decode,
                          self._encode)

    def _decode(self, ids) -> str:
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=False)

    def _encode(self, text: str) -> list[int]:
        return self.hf_tokenizer(text, add_special_tokens=False)["input_ids"]


# Tokens decoded past a marker's length when looking for it: a token may carry no text of its own
# (a byte of a multi-byte character, an empty special token).
TAIL_SLACK = 4


class RowMatcher:
    """One generated row's constraint state. While gated, every token is allowed and the row's
    text is watched for the marker, whatever tokens write it (the canonical ones or others); the
    constraint starts right after it. Text that the marker's last token carries past the marker
    is given to the constraint (whitespace aside, as the answer's parse drops it)."""

    def __init__(self, template, gate: str | None, words: int, decode=None, encode=None):
        self._template = template
        self._gate = gate
        self._decode = decode
        self._encode = encode
        self._tail: list[int] = []
        self._words = words
        self.llm = None if gate else template.deep_copy()  # None while gated

    def fill(self, out: torch.Tensor) -> None:
        """Write the allowed tokens into ``out`` (int32 [words], contiguous, on the CPU): all of
        them while gated; only EOS after an error (llguidance's choice: end the row)."""
        import torch

        if out.dtype != torch.int32 or out.device.type != "cpu" or not out.is_contiguous() \
                or out.numel() != self._words:
            raise ValueError(f"fill needs a contiguous CPU int32 tensor of {self._words} words, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if self.llm is None:
            out.fill_(-1)
        else:
            self.llm.unsafe_compute_mask_ptr(out.data_ptr(), 4 * self._words)

    def advance(self, token: int) -> None:
        """Consume the sampled token (a rejected one puts the matcher in ``error``)."""
        if self.llm is not None:
            self.llm.consume_token(int(token))
            return
        self._tail.append(int(token))
        del self._tail[:-(len(self._gate) + TAIL_SLACK)]
        text = self._decode(self._tail)
        at = text.find(self._gate)
        if at < 0:
            return
        self.llm = self._template.deep_copy()
        rest = text[at + len(self._gate):].lstrip()
        if rest:  # the marker's token went on into the answer
            self.llm.consume_tokens(self._encode(rest))

    @property
    def accepting(self) -> bool:
        """The output so far is complete under the constraint (it may end here)."""
        return self.llm is not None and not self.llm.is_error() and self.llm.is_accepting()

    @property
    def error(self) -> str | None:
        """llguidance's error once it stopped the row: a limit it hit (a parser row over 2000
        items, lexer fuel), or a rejected token (never, while its masks are applied)."""
        if self.llm is None or not self.llm.is_error():
            return None
        return describe(self.llm.get_error())


# Masks of at least this many int32 words in all are filled by llguidance's thread pool: at 32
# rows, measured on this 2-core box, serial filling was faster at the tiny model's vocabulary
# (0.29 vs 0.41 ms per step, 15 words a row) and slower at GPT-2's (1,571 words a row).
PARALLEL_WORDS = 16384


class Matchers:
    """One decoder run's matchers, by request index (None where a request is unconstrained)."""

    def __init__(self, grammars: Grammars | None, constraints: list[Constraint | None],
                 gate: str | None = None, prompts: list[tuple[int, ...]] | None = None):
        if grammars is None and any(c is not None for c in constraints):
            raise ValueError("constrained requests need a Grammars (the replica's tokenizer)")
        self.grammars = grammars
        prompts = prompts or [()] * len(constraints)
        self.rows = [None if c is None else grammars.matcher(c, gate, p)
                     for c, p in zip(constraints, prompts)]
        self.active = any(r is not None for r in self.rows)

    def extend(self, other: Matchers) -> None:
        """Append ``other``'s rows (the same matcher objects) after these: a decoder that takes
        requests while it runs (``feed``) indexes them from ``len(rows)`` on."""
        self.grammars = self.grammars or other.grammars
        self.rows.extend(other.rows)
        self.active = self.active or other.active

    def bitmask(self, indices: list[int | None], device) -> torch.Tensor:
        """int32 [len(indices), words] on ``device``: each request's allowed tokens; all ones for
        None (padding) and unconstrained requests. Computed on the CPU in parallel, copied once."""
        import torch

        start = time.perf_counter()
        pinned = torch.device(device).type == "cuda"
        out = torch.full((len(indices), self.grammars.words), -1, dtype=torch.int32,
                         pin_memory=pinned)
        live = [(row.llm, k) for k, i in enumerate(indices)
                if i is not None and (row := self.rows[i]) is not None and row.llm is not None]
        if len(live) * self.grammars.words >= PARALLEL_WORDS:
            self.grammars.executor.unsafe_compute_mask_ptr(live, out.data_ptr(), 4 * out.shape[1],
                                                           out.shape[0])
        else:  # small masks: the thread pool costs more than it saves
            for llm, k in live:
                llm.unsafe_compute_mask_ptr(out[k].data_ptr(), 4 * out.shape[1])
        # The caching host allocator keeps a pinned buffer alive until its copy has run.
        moved = out.to(device, non_blocking=pinned)
        self.grammars.stats.masks += len(live)
        self.grammars.stats.mask_seconds += time.perf_counter() - start
        return moved

    def advance(self, index: int, token: int) -> None:
        row = self.rows[index]
        if row is not None:
            row.advance(token)

    def truncated(self, index: int) -> bool:
        """Constrained and not complete (max_new_tokens hit mid-object; a reasoning model that
        never ended its thinking)."""
        row = self.rows[index]
        return row is not None and not row.accepting

    def error(self, index: int) -> str | None:
        row = self.rows[index]
        return None if row is None else row.error


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` [B, V] with the tokens ``bitmask`` (int32 [B, words], same device) disallows set
    to -inf, as a new tensor. Device ops only (no host sync), so it can be captured in a CUDA
    graph. Tokens past 32*words are disallowed; bits past V are ignored."""
    import torch

    batch, vocab = logits.shape
    # Little-endian bytes of the int32 words: token t is bit t % 8 of byte t // 8. One byte per
    # token in the temporaries instead of four.
    data = bitmask.contiguous().view(torch.uint8)
    shifts = torch.arange(8, device=bitmask.device, dtype=torch.uint8)
    banned = ((data.unsqueeze(-1) >> shifts) & 1).view(batch, -1) == 0
    width = banned.shape[1]
    if vocab <= width:
        banned = banned[:, :vocab]
    else:
        banned = torch.cat([banned, banned.new_ones(batch, vocab - width)], dim=1)
    return logits.masked_fill(banned, float("-inf"))
