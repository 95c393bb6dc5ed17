"""The fixed, finite set of step shapes (T tokens, S rows, P blocks per row) the engine compiles.

Every step is compiled once per shape key (tokens, rows, blocks per row: see :mod:`jaxllm.step`;
every sampling feature but Python logits processors rides in those shapes), and on CPU one
compile of SmolLM2-135M takes 15-25 s. Independent power-of-two buckets for T, S and P give
392 possible keys for the defaults (49 (T, S) pairs with S <= T, times 8 P buckets): too many
to warm up, so new keys appear in the middle of a workload. :class:`BucketPolicy` instead lists a small set of keys up front
(``keys()``), and ``pick()`` maps every step the scheduler can produce to one of them.

What padding costs (CPU, float32 SmolLM2-135M, pure-JAX reference attention, 2 threads):

- tokens (T), dense part: a step reads all weights once (~17 ms) and does ~0.2 GFLOP per
  token; below ~16-32 tokens it is memory-bound, so padding small steps is nearly free.
- tokens x blocks (T x P), attention: every token gathers its row's P blocks, ~0.74 MB of K/V per
  token-block (~24 us). A 512-token step with P=128 gathers ~47 GB. Padding P is cheap for small
  T and costly for large T.
- rows (S), sampler: per padded row ~0.5 ms greedy, ~2.5 ms with temperature (Gumbel noise over
  the vocabulary) and ~17 ms when some row uses top-p/top-k/min-p (sorting 49k logits). Rows
  are the most expensive thing to pad, so decode steps get the finest buckets.

The policy:

- decode steps (one token per row, ``num_tokens == num_rows``, the steady state of generation)
  use ``T = S`` from a fine row ladder (``decode_row_growth``, default 2: 1, 2, 4, ..., 64), so
  they pay no token padding beyond row padding;
- steps with prefill tokens (``num_tokens > num_rows``) take T from a coarser token ladder
  (``token_growth`` 4 from ``min_tokens`` 8: 8, 32, 128, 512) and S from a coarse row ladder
  (``row_growth`` 8: 1, 8, 64), clamped to ``S <= T``;
- P comes from a block ladder (``block_growth`` 4 down from the maximum: 2, 8, 32, 128), thinned
  per token bucket: a block bucket is dropped for token bucket T when padding its steps up to
  the next bucket gathers at most ``attention_slack`` token x context positions (default
  16384, ~0.75 GB of K/V for SmolLM2, ~25 ms here). Small steps thus take few P buckets (T <= 8
  only P = max), large steps all of them.

Ladders are built top-down from each maximum (max, max/g, max/g^2, ... down to the floor), so the
largest buckets are never closer than the growth factor. Every key listed is reachable by some
step and no impossible combination (S > T, a decode key with S != T) is listed.

For the defaults (max_num_batched_tokens=512, max_num_seqs=64, max_blocks_per_seq=128,
block_size=16) that is 37 keys: 11 decode keys and 26 prefill/mixed keys (``describe()``).
The engine's policy (``from_config``) adapts two knobs to the platform: on CPU decode rows
grow by 1.5, and with the CPU attention kernel, which never reads past a row's context, there
is a single block bucket (SmolLM2-135M's engine defaults: 23 keys).
Trading the other way: ``row_growth=4`` gives 47 keys and pads mixed steps' rows 4x less;
``attention_slack=8192`` gives 45 keys; independent power-of-two buckets (the
former scheme, with S <= T) give 392.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any

BaseKey = tuple[int, int, int]  # (T tokens, S rows, P blocks per row)
CPU_DECODE_ROW_GROWTH = 1.5


def ladder(top: int, growth: float, floor: int = 1) -> tuple[int, ...]:
    """Ascending buckets ``top, ceil(top/g), ceil(top/g^2), ...`` down to ``floor`` (included).

    ``growth`` may be fractional (> 1); each bucket is at least one below the previous.
    """
    if top < 1 or growth <= 1 or floor < 1:
        raise ValueError(f"need top >= 1, growth > 1, floor >= 1; got {top}, {growth}, {floor}")
    floor = min(floor, top)
    buckets = [top]
    while buckets[-1] > floor:
        buckets.append(max(floor, min(buckets[-1] - 1, int(-(-buckets[-1] // growth)))))
    return tuple(sorted(set(buckets)))


def ceil_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (``buckets`` ascending)."""
    index = bisect.bisect_left(buckets, n)
    if index == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[index]


@dataclasses.dataclass(frozen=True)
class BucketPolicy:
    """Which (T, S, P) shape each step uses, out of a fixed set listed by :meth:`keys`.

    Args:
        max_num_batched_tokens, max_num_seqs: the scheduler's per-step limits.
        max_blocks_per_seq: ceil(max_model_len / block_size), the widest block table row.
        block_size: tokens per KV block (converts ``attention_slack`` into blocks).
        decode_row_growth: ladder factor of decode steps (T = S), > 1 and may be fractional;
            2 keeps sampler padding low, 1.5 (the CPU default, see :meth:`from_config`) also
            the dense math's.
        token_growth, min_tokens: token ladder of steps with prefill tokens.
        row_growth: row ladder of steps with prefill tokens.
        block_growth, min_blocks: block ladder before per-T thinning.
        attention_slack: the most padded token x context positions (T x P x block_size) a step
            may gather so that one fewer key is compiled; 0 keeps every block bucket for every T.
        speculative_tokens, speculative_rows: speculative decoding's k and the most rows that
            speculate (``disable_by_batch_size``): adds "verify" pairs (T = S (k + 1), S) for
            the decode row buckets S up to that many rows, so that a row of its last token and
            k proposals is not padded to the token ladder (1 row, k = 4: 5 tokens, not 8; on
            CPU, where a 5-row product of the quantized kernels is compute-bound, a verify
            step of 8 rows cost ~1.7x one of 5). A step takes its verify pair where that has
            no more tokens and rows than its ladder pair.
    """

    max_num_batched_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int
    block_size: int = 16
    decode_row_growth: float = 2
    token_growth: int = 4
    min_tokens: int = 8
    row_growth: int = 8
    block_growth: int = 4
    min_blocks: int = 2
    attention_slack: int = 16384
    speculative_tokens: int = 0
    speculative_rows: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_blocks_per_seq", "block_size",
                     "min_tokens", "min_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"BucketPolicy.{name} must be positive, got {getattr(self, name)}")
        if self.decode_row_growth <= 1:
            raise ValueError(f"BucketPolicy.decode_row_growth must be above 1, got {self.decode_row_growth}")
        for name in ("token_growth", "row_growth", "block_growth"):
            if getattr(self, name) < 2:
                raise ValueError(f"BucketPolicy.{name} must be at least 2, got {getattr(self, name)}")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) exceeds max_num_batched_tokens "
                             f"({self.max_num_batched_tokens})")
        if self.attention_slack < 0:
            raise ValueError(f"attention_slack must be >= 0, got {self.attention_slack}")
        if self.speculative_tokens < 0 or self.speculative_rows < 0:
            raise ValueError(f"speculative_tokens and speculative_rows must be >= 0, got "
                             f"{self.speculative_tokens}, {self.speculative_rows}")

    @classmethod
    def from_config(cls, config: Any, platform: str, **overrides: Any) -> "BucketPolicy":
        """From a resolved :class:`jaxllm.config.EngineConfig` (``Engine.config``) on
        ``platform`` (``Engine.platform``).

        On CPU decode rows grow by 1.5 instead of 2 (1, 2, 3, 4, 5, 7, 10, 14, 20, 29, 43, 64):
        a padded row costs its full share of the dense math there (~2 ms for SmolLM2-135M),
        and in the 64-request benchmark the power-of-two 64-row bucket ran at 50 real rows on
        average. On GPU a padded decode row is nearly free.

        With the CPU attention kernel (``attention="cpu"``), which reads only each row's
        context, padded block tables cost nothing: every key takes the full block-table
        width, one block bucket. For SmolLM2's defaults that is 23 keys instead of 51.
        """
        max_blocks = -(-config.max_model_len // config.block_size)
        fields = dict(max_num_batched_tokens=config.max_num_batched_tokens,
                      max_num_seqs=config.max_num_seqs, max_blocks_per_seq=max_blocks,
                      block_size=config.block_size,
                      decode_row_growth=CPU_DECODE_ROW_GROWTH if platform == "cpu" else 2,
                      min_blocks=max_blocks if config.attention == "cpu" else 2)
        spec = config.speculative_config
        if spec is not None:
            fields.update(speculative_tokens=spec.num_speculative_tokens,
                          speculative_rows=min(spec.disable_by_batch_size, config.max_num_seqs))
        return cls(**{**fields, **overrides})

    # ---- ladders ----
    @functools.cached_property
    def decode_rows(self) -> tuple[int, ...]:
        return ladder(self.max_num_seqs, self.decode_row_growth)

    @functools.cached_property
    def tokens(self) -> tuple[int, ...]:
        return ladder(self.max_num_batched_tokens, self.token_growth, self.min_tokens)

    @functools.cached_property
    def rows(self) -> tuple[int, ...]:
        return ladder(self.max_num_seqs, self.row_growth)

    @functools.cached_property
    def _block_ladders(self) -> dict[int, tuple[int, ...]]:
        base = ladder(self.max_blocks_per_seq, self.block_growth, self.min_blocks)
        token_buckets = set(self.decode_rows) | set(self.tokens) | {t for t, _ in self.verify_pairs}
        return {t: self._thin_blocks(t, base) for t in sorted(token_buckets)}

    def _thin_blocks(self, num_tokens: int, base: tuple[int, ...]) -> tuple[int, ...]:
        """Drops block buckets whose steps could pad up to the next kept one within the slack."""
        kept = [base[-1]]
        for p in reversed(base[:-1]):
            if num_tokens * kept[-1] * self.block_size > self.attention_slack:
                kept.append(p)
        return tuple(sorted(kept))

    def blocks(self, num_tokens_bucket: int) -> tuple[int, ...]:
        """The block buckets of token bucket T."""
        return self._block_ladders[num_tokens_bucket]

    @functools.cached_property
    def verify_pairs(self) -> tuple[tuple[int, int], ...]:
        """(T, S) of speculative verify steps: S decode-bucket rows of k + 1 tokens each."""
        if not (self.speculative_tokens and self.speculative_rows):
            return ()
        most = ceil_bucket(min(self.speculative_rows, self.max_num_seqs), self.decode_rows)
        width = self.speculative_tokens + 1
        return tuple((s * width, s) for s in self.decode_rows
                     if s <= most and s * width <= self.max_num_batched_tokens)

    # ---- the set and the choice ----
    def _pair(self, num_tokens: int, num_rows: int) -> tuple[int, int]:
        if num_tokens == num_rows:
            size = ceil_bucket(num_rows, self.decode_rows)
            return size, size
        t = ceil_bucket(num_tokens, self.tokens)
        s = min(ceil_bucket(num_rows, self.rows), t)
        for verify_t, verify_s in self.verify_pairs:
            if num_tokens <= verify_t <= t and num_rows <= verify_s <= s:
                return verify_t, verify_s
        return t, s

    def pick(self, num_tokens: int, num_rows: int, max_context_blocks: int) -> BaseKey:
        """(T, S, P) for a step of ``num_tokens`` tokens in ``num_rows`` rows whose longest
        cached context spans ``max_context_blocks`` blocks; always a member of :meth:`keys`."""
        if not 1 <= num_rows <= min(num_tokens, self.max_num_seqs):
            raise ValueError(f"num_rows must be in [1, min(num_tokens, max_num_seqs)], got "
                             f"{num_rows} rows for {num_tokens} tokens (max_num_seqs {self.max_num_seqs})")
        if num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"{num_tokens} tokens exceed max_num_batched_tokens {self.max_num_batched_tokens}")
        if not 0 <= max_context_blocks <= self.max_blocks_per_seq:
            raise ValueError(f"max_context_blocks must be in [0, {self.max_blocks_per_seq}], "
                             f"got {max_context_blocks}")
        t, s = self._pair(num_tokens, num_rows)
        return t, s, ceil_bucket(max(1, max_context_blocks), self.blocks(t))

    @functools.cached_property
    def _pairs(self) -> tuple[tuple[int, int], ...]:
        """Every (T, S) some step maps to: decode pairs, then one per reachable ladder interval."""
        pairs = {(d, d) for d in self.decode_rows} | set(self.verify_pairs)
        row_lows = (0,) + self.rows[:-1]
        for t in self.tokens:
            for low, high in zip(row_lows, self.rows):
                # A step with prefill has rows < tokens: the fewest rows of this interval
                # (low + 1) with the most tokens of t's interval (t) is the easiest to reach.
                if low + 1 < t:
                    pairs.add((t, min(high, t)))
        return tuple(sorted(pairs))

    def keys(self) -> tuple[BaseKey, ...]:
        """The fixed set of base keys, sorted; each is reachable by some step."""
        return tuple((t, s, p) for t, s in self._pairs for p in self.blocks(t))

    def __len__(self) -> int:
        return len(self.keys())

    def describe(self) -> dict[str, Any]:
        """Set size and ladders, for logs and docs."""
        keys = self.keys()
        num_decode = sum(1 for t, s, _ in keys if t == s and t in self.decode_rows)
        return {
            "num_keys": len(keys), "num_decode_keys": num_decode,
            "num_prefill_keys": len(keys) - num_decode,
            "decode_rows": self.decode_rows, "tokens": self.tokens, "rows": self.rows,
            "verify": self.verify_pairs,
            "blocks": {t: self.blocks(t) for t in sorted({k[0] for k in keys})},
        }
