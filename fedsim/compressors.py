"""The compressor zoo as codecs (`fedsim.codecs` registers them): top-k, random-k, QSGD, scaled sign, natural,
PowerSGD.

The vector codecs compress the whole message flattened into one vector (`scope: model`) or each tensor on its own
(`scope: tensor`); PowerSGD compresses each matrix to rank r. Payloads hold what would be sent (values, bit-packed
codes, scales, a key, low-rank factors), so `payload_bytes` is their exact size; randomized codecs draw only from the
`key` they are given (`fedsim.keyed_random`: SplitMix64 for the per-entry draws of random-k, QSGD and natural,
Philox for PowerSGD's first queries), so every runtime draws the same numbers, and encode/decode are pure tensor
functions that run under `torch.func.vmap`. Codes are worked on in int32 where they fit (`bitpack.int_dtype`), which
is several times faster than int64 on CPU.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from fractions import Fraction
from functools import reduce
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from fedsim import bitpack, keyed_random
from fedsim.errors import ScenarioError
from fedsim.params import Pytree, tree_leaves, tree_map
from fedsim.registry import Params

if TYPE_CHECKING:
    from fedsim.codecs import Payload

Scope = Literal["model", "tensor"]
"""Compress the message as one flat vector (model) or each of its tensors on its own (tensor)."""

KEY_BYTES = 8
"""A payload's random key: two uint32 words, sent as int32."""


def value_dtype(tree: Pytree) -> torch.dtype:
    """The dtype all leaves promote to: model-scope values travel in it."""
    return reduce(torch.promote_types, (t.dtype for t in tree_leaves(tree)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a codec computes (and sends scales) in: float64 for float64 values, else float32 (keyed draws and
    float16 norms need no narrower type)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flatten(tree: Pytree) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(value_dtype(tree)) for t in tree_leaves(tree)])


def _unflatten(flat: torch.Tensor, template: Pytree) -> Pytree:
    parts = iter(torch.split(flat, [t.numel() for t in tree_leaves(template)]))
    return tree_map(lambda t: next(parts).reshape(t.shape).to(t.dtype), template)


def _key_words(key: torch.Tensor) -> torch.Tensor:
    """An int64 (2,) key of uint32 words as int32 (their bit patterns): 8 bytes on the wire."""
    return ((key ^ 0x80000000) - 0x80000000).to(torch.int32)


def _key_of(words: torch.Tensor) -> torch.Tensor:
    return words.long() & 0xFFFFFFFF


def _leaf_keys(key: torch.Tensor | None) -> Iterator[torch.Tensor | None]:
    """Tensor scope's per-leaf keys, fold_in(key, i) for leaf i in `tree_leaves` order; Nones without a key."""
    return (None if key is None else keyed_random.fold_in(key, i) for i in itertools.count())


def _scatter(indices: torch.Tensor, values: torch.Tensor, d: int) -> torch.Tensor:
    """A length-d tensor of zeros with `values` at `indices`: what the receiver of a sparse payload rebuilds."""
    return values.new_zeros(d).scatter(0, indices.long(), values)


class VectorCodec(ABC):
    """Scope handling for codecs that compress one flat vector: the message flattened in the dtype its leaves
    promote to (model scope), or each leaf on its own with key fold_in(key, i) for leaf i (tensor scope, payload
    `{"tensors": per-leaf payloads}`). Codecs whose receiver redraws from the key (`sends_key`) send it once."""

    params: Params
    randomized = False
    sends_key = False

    def init(self, template: Pytree) -> Pytree:
        return {}

    @abstractmethod
    def encode_vector(self, x: torch.Tensor, key: torch.Tensor) -> Payload:
        """The payload of the 1-D tensor x."""

    @abstractmethod
    def decode_vector(self, payload: Payload, key: torch.Tensor | None, d: int, dtype: torch.dtype) -> torch.Tensor:
        """The length-d vector of `dtype` a vector payload stands for (`key`: the encoder's, when `sends_key`)."""

    @abstractmethod
    def vector_bytes(self, d: int, dtype: torch.dtype) -> int:
        """Exact bytes of one vector payload for d entries of `dtype`."""

    def shared(self, state: Pytree) -> Pytree:
        return {}

    def round_trip_vector(self, x: torch.Tensor, key: torch.Tensor) -> tuple[Payload, torch.Tensor]:
        """(the payload of x, the vector its receiver rebuilds), bit for bit `decode_vector` of `encode_vector`;
        codecs override it to skip work the receiver would redo."""
        payload = self.encode_vector(x, key)
        return payload, self.decode_vector(payload, key if self.sends_key else None, x.shape[-1], x.dtype)

    def _code(self, message: Pytree, key: torch.Tensor, rebuild: bool) -> tuple[Payload, Pytree | None]:
        """The payload in the codec's scope, and with `rebuild` the message its receiver decodes (else None)."""
        def vector(x: torch.Tensor, k: torch.Tensor) -> tuple[Payload, torch.Tensor | None]:
            return self.round_trip_vector(x, k) if rebuild else (self.encode_vector(x, k), None)

        if self.params.scope == "tensor":
            keys = _leaf_keys(key if self.randomized else None)
            coded = [vector(t.reshape(-1), next(keys)) for t in tree_leaves(message)]
            payloads, vectors = iter(p for p, _ in coded), iter(v for _, v in coded)
            payload = {"tensors": tree_map(lambda t: next(payloads), message)}
            decoded = tree_map(lambda t: next(vectors).reshape(t.shape), message) if rebuild else None
        else:
            payload, flat = vector(_flatten(message), key)
            decoded = _unflatten(flat, message) if rebuild else None
        return ({**payload, "key": _key_words(key)} if self.sends_key else payload), decoded

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor, *, first: bool = False) -> tuple[Payload,
                                                                                                         Pytree]:
        return self._code(message, key, rebuild=False)[0], state

    def round_trip(self, message: Pytree, state: Pytree, key: torch.Tensor, *,
                   first: bool = False) -> tuple[Payload, Pytree, Pytree]:
        payload, decoded = self._code(message, key, rebuild=True)
        return payload, decoded, state

    def decode(self, payload: Payload, template: Pytree, shared: Pytree) -> tuple[Pytree, Pytree]:
        key = _key_of(payload["key"]) if self.sends_key else None
        if self.params.scope == "tensor":
            keys = _leaf_keys(key)
            return tree_map(lambda t, p: self.decode_vector(p, next(keys), t.numel(), t.dtype).reshape(t.shape),
                            template, payload["tensors"]), shared
        d = sum(t.numel() for t in tree_leaves(template))
        return _unflatten(self.decode_vector(payload, key, d, value_dtype(template)), template), shared

    def check(self, template: Pytree, field_path: str) -> None:
        """Any message fits (k and ratio are clipped to each vector's size)."""
        return None

    def payload_bytes(self, template: Pytree, *, first: bool = False) -> int:
        """The vector payloads' bytes (per leaf in tensor scope, in the leaf's dtype), plus the key if sent."""
        key = KEY_BYTES if self.sends_key else 0
        if self.params.scope == "tensor":
            return key + sum(self.vector_bytes(t.numel(), t.dtype) for t in tree_leaves(template))
        return key + self.vector_bytes(sum(t.numel() for t in tree_leaves(template)), value_dtype(template))


class SparsityParams(Params):
    """Keep `ratio` of the entries (or `k` of them), over the whole model or per tensor."""

    ratio: float | None = Field(None, gt=0, le=1)
    k: int | None = Field(None, ge=1)
    scope: Scope = "model"

    @model_validator(mode="after")
    def _exactly_one(self) -> SparsityParams:
        if (self.ratio is None) == (self.k is None):
            raise ValueError("give exactly one of ratio and k")
        return self


class Sparsifier(VectorCodec):
    """A codec that keeps k of d entries."""

    params: SparsityParams

    def k(self, d: int) -> int:
        """Entries kept out of d: max(1, ceil(ratio*d)), with ratio read as the decimal written (0.07 of 100 is 7,
        not float 0.07*100 = 7.000000000000001 -> 8); or min(k, d). Never more than d (an empty leaf keeps 0)."""
        if self.params.k is not None:
            return min(self.params.k, d)
        return min(d, max(1, math.ceil(Fraction(repr(self.params.ratio)) * d)))


def _index_dtype(d: int) -> torch.dtype:
    return torch.int32 if d < 2**31 else torch.int64


def _top_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest-magnitude entries of a 1-D tensor, largest first, by torch.topk on abs: ties go
    the way torch's kernel sends them, the same run to run and under vmap on one device, not by lowest index
    (a stable sort would pin that order everywhere, but is ~7x slower on CPU at 10M entries)."""
    return torch.topk(flat.abs(), k).indices.to(_index_dtype(flat.shape[-1]))


class TopKParams(SparsityParams):
    """Top-k sparsification: keep `ratio` of the entries (or `k` of them), over the whole model or per tensor."""


class TopK(Sparsifier):
    """Top-k sparsification: the k largest-magnitude entries as indices plus values.

    Stich, Cordonnier, Jaggi 2018; Alistarh et al. 2018. Indices are int32 (int64 from 2^31 entries); the receiver
    scatters the values into zeros."""

    def __init__(self, params: TopKParams) -> None:
        self.params = params

    def encode_vector(self, x: torch.Tensor, key: torch.Tensor) -> Payload:
        indices = _top_indices(x, self.k(x.shape[-1]))
        return {"indices": indices, "values": x.gather(0, indices.long())}

    def decode_vector(self, payload: Payload, key: torch.Tensor | None, d: int, dtype: torch.dtype) -> torch.Tensor:
        return _scatter(payload["indices"], payload["values"], d)

    def vector_bytes(self, d: int, dtype: torch.dtype) -> int:
        """k * (index size + value size): 4 bytes an index below 2^31 entries, else 8; values in the message dtype
        (in model scope the dtype all leaves promote to)."""
        return self.k(d) * (_index_dtype(d).itemsize + dtype.itemsize)


def _random_indices(key: torch.Tensor, d: int, k: int) -> torch.Tensor:
    """k distinct indices of range(d), uniformly at random from `key`, the same on every device: the k largest of
    distinct int64 scores, entry i's being SplitMix64 output i with its low b bits (b = bits of d - 1) replaced by i,
    so 64 - b random bits decide and no tie is left to a kernel."""
    index_bits = max(1, (d - 1).bit_length())
    scores = keyed_random.splitmix64(key, d, lambda z, i: z.bitwise_and_(-(1 << index_bits)).bitwise_or_(i))
    return torch.topk(scores, k).indices


class RandomKParams(SparsityParams):
    """Random-k sparsification; `scaling: unbiased` multiplies the kept entries by d/k, `biased` keeps them as is."""

    scaling: Literal["biased", "unbiased"] = "unbiased"


class RandomK(Sparsifier):
    """Random-k sparsification: k entries chosen uniformly at random, sent as their values plus the key.

    Stich, Cordonnier, Jaggi 2018; CHOCO-SGD's random-biased and random-unbiased. The receiver redraws the indices
    from the key, so no index travels."""

    randomized = sends_key = True

    def __init__(self, params: RandomKParams) -> None:
        self.params = params

    def encode_vector(self, x: torch.Tensor, key: torch.Tensor) -> Payload:
        d = x.shape[-1]
        return {"values": x.gather(0, _random_indices(key, d, self.k(d)))}

    def decode_vector(self, payload: Payload, key: torch.Tensor | None, d: int, dtype: torch.dtype) -> torch.Tensor:
        return self._rebuild(_random_indices(key, d, self.k(d)), payload["values"], d)

    def round_trip_vector(self, x: torch.Tensor, key: torch.Tensor) -> tuple[Payload, torch.Tensor]:
        """The indices drawn once, where encode and decode each draw them (the draw is most of the cost)."""
        d = x.shape[-1]
        indices = _random_indices(key, d, self.k(d))
        values = x.gather(0, indices)
        return {"values": values}, self._rebuild(indices, values, d)

    def _rebuild(self, indices: torch.Tensor, values: torch.Tensor, d: int) -> torch.Tensor:
        """The kept values at their indices, scaled by d/k when unbiased."""
        if self.params.scaling == "unbiased" and len(indices) < d:
            values = values * (d / len(indices))
        return _scatter(indices, values, d)

    def vector_bytes(self, d: int, dtype: torch.dtype) -> int:
        """k values in the message dtype (the key is counted once per payload)."""
        return self.k(d) * dtype.itemsize


class QSGDParams(Params):
    """QSGD with `levels` s quantization levels; `variant: contractive` scales by 1/(min(d/s^2, sqrt(d)/s) + 1)."""

    levels: int = Field(ge=1, le=2**31 - 1)
    variant: Literal["unbiased", "contractive"] = "unbiased"
    scope: Scope = "model"


class QSGD(VectorCodec):
    """QSGD stochastic quantization to s levels: the norm plus a packed sign and level per entry.

    Alistarh et al. 2017; CHOCO-SGD's qsgd_quantize. s|x_i|/||x|| is rounded stochastically to a level l_i in 0..s,
    sent in ceil(log2(s+1)) + 1 bits with the sign; the receiver rebuilds sign(x_i) ||x|| l_i / s."""

    randomized = True

    def __init__(self, params: QSGDParams) -> None:
        self.params = params
        self.width = params.levels.bit_length() + 1

    def _quantize(self, x: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(||x||, the codes level << 1 | sign, unpacked)."""
        s, v, codes = self.params.levels, x.to(compute_dtype(x.dtype)), bitpack.int_dtype(self.width)
        norm = torch.linalg.vector_norm(v)
        level = v.abs().div_(torch.where(norm > 0, norm, 1)).mul_(s)
        lower = level.floor()
        up = keyed_random.fast_uniform(key, v.shape, v.dtype) < level.sub_(lower)
        levels = up.to(codes).add_(lower.to(codes)).clamp_max_(s)  # in place on what depends on key and x alike
        return norm, levels.bitwise_left_shift_(1).bitwise_or_((v < 0).to(codes))

    def encode_vector(self, x: torch.Tensor, key: torch.Tensor) -> Payload:
        norm, codes = self._quantize(x, key)
        return {"norm": norm, "codes": bitpack.pack(codes, self.width)}

    def decode_vector(self, payload: Payload, key: torch.Tensor | None, d: int, dtype: torch.dtype) -> torch.Tensor:
        return self._dequantize(bitpack.unpack(payload["codes"], self.width, d), payload["norm"], dtype)

    def round_trip_vector(self, x: torch.Tensor, key: torch.Tensor) -> tuple[Payload, torch.Tensor]:
        """Dequantized from the codes before packing, where the receiver unpacks them."""
        norm, codes = self._quantize(x, key)
        payload = {"norm": norm, "codes": bitpack.pack(codes, self.width)}
        return payload, self._dequantize(codes, norm, x.dtype)

    def _dequantize(self, codes: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """norm * (+-level) / s from the codes (in place on them), divided as the variant says."""
        s, d = self.params.levels, codes.shape[-1]
        signs = (codes & 1).mul_(-2).add_(1)
        out = codes.bitwise_right_shift_(1).mul_(signs).to(norm.dtype).mul_(norm).div_(s)  # norm * (+-level) / s
        if self.params.variant == "contractive":
            out = out.div_(min(d / s**2, math.sqrt(d) / s) + 1)
        return out.to(dtype)

    def vector_bytes(self, d: int, dtype: torch.dtype) -> int:
        """The norm (float32, float64 for float64 values) and d codes of ceil(log2(s+1)) + 1 bits, packed."""
        return compute_dtype(dtype).itemsize + bitpack.packed_size(d, self.width)


class ScopeParams(Params):
    """Only the scope: the whole model as one vector or each tensor on its own."""

    scope: Scope = "model"


class ScaledSign(VectorCodec):
    """Scaled sign: sign(x) ||x||_1 / d, sent as one scale plus one packed bit per entry.

    Bernstein et al. 2018; Karimireddy et al. 2019 (EF-SignSGD's scaled sign). Zeros go as +."""

    def __init__(self, params: ScopeParams) -> None:
        self.params = params

    def encode_vector(self, x: torch.Tensor, key: torch.Tensor) -> Payload:
        v = x.to(compute_dtype(x.dtype))
        signs = (v < 0).to(bitpack.int_dtype(1))
        return {"scale": v.abs().sum() / max(1, v.shape[-1]), "signs": bitpack.pack(signs, 1)}

    def decode_vector(self, payload: Payload, key: torch.Tensor | None, d: int, dtype: torch.dtype) -> torch.Tensor:
        scale = payload["scale"]
        return bitpack.unpack(payload["signs"], 1, d).mul_(-2).add_(1).to(scale.dtype).mul_(scale).to(dtype)

    def vector_bytes(self, d: int, dtype: torch.dtype) -> int:
        """The scale (float32, float64 for float64 values) and one bit per entry, packed."""
        return compute_dtype(dtype).itemsize + bitpack.packed_size(d, 1)


def _exponent_range(dtype: torch.dtype) -> tuple[int, int]:
    """The smallest and largest exponent e of a normal 2^e in `dtype`."""
    info = torch.finfo(dtype)
    return math.frexp(info.smallest_normal)[1] - 1, math.frexp(info.max)[1] - 1


_SAME_SIZE_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
                  torch.float64: torch.int64}


def _fraction_bits(dtype: torch.dtype) -> int:
    """Bits of the fraction field of `dtype` (23 for float32): eps = 2^-bits."""
    return 1 - math.frexp(torch.finfo(dtype).eps)[1]


def _exponent_and_fraction(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The biased exponent field E and the fraction field F of each entry of x, read from its bits in x's own format:
    |x| = (1 + F 2^-m) 2^(E - bias) for E > 0, F 2^-m 2^(1 - bias) for E = 0 (zero and subnormals)."""
    m = _fraction_bits(x.dtype)
    word = x.view(_SAME_SIZE_INT[x.dtype])
    return (word >> m).bitwise_and_((1 << (8 * x.element_size() - 1 - m)) - 1), word & ((1 << m) - 1)


def _signed_power_of_two(code: torch.Tensor, negative: torch.Tensor, low: int, dtype: torch.dtype) -> torch.Tensor:
    """+-2^(code - 1 + low) (0 for code 0; minus where `negative` is 1) as float32 or float64 built from its bits:
    biased exponent code - 1 + low + bias, sign bit `negative`."""
    integer, m = _SAME_SIZE_INT[dtype], _fraction_bits(dtype)
    offset = low - 1 + _exponent_range(dtype)[1]
    code = code.to(integer)
    magnitude = code << m if offset == 0 else ((code + offset) << m).mul_((code > 0).to(integer))
    return magnitude.bitwise_or_(negative.to(integer).bitwise_left_shift_(8 * dtype.itemsize - 1)).view(dtype)


class Natural(VectorCodec):
    """Natural compression: each entry rounded stochastically (unbiased) to one of its two nearest powers of two.

    Horváth et al. 2019. Sent as sign + exponent code, packed: 9 bits for float32, 6 for float16, 12 for float64.
    Zeros stay zero; entries below the smallest normal go to 0 or to it, unbiased too."""

    randomized = True

    def __init__(self, params: ScopeParams) -> None:
        self.params = params

    @staticmethod
    def exponent_bits(dtype: torch.dtype) -> int:
        """Bits of an exponent code: 0 for zero, 1 + e - e_min for 2^e."""
        low, high = _exponent_range(dtype)
        return (high - low + 1).bit_length()

    def encode_vector(self, x: torch.Tensor, key: torch.Tensor) -> Payload:
        """Code E + [u < F 2^-m] for |x| = (1 + F 2^-m) 2^(E - bias), u uniform: the exponent code of the power of
        two below |x| is E, and it rounds up to the one above with chance F 2^-m = |x| / 2^(E - bias) - 1. A
        subnormal (E = 0) goes to 0 or the smallest normal (code 1) with chance F 2^-m = |x| / smallest normal.
        Read from the bits, with no frexp or where (each several times slower on CPU than the integer ops)."""
        return {"codes": bitpack.pack(self._words(x, key), self.exponent_bits(x.dtype) + 1)}

    def _words(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Each entry's sign << exponent bits | exponent code, unpacked."""
        low, high = _exponent_range(x.dtype)
        bits = self.exponent_bits(x.dtype)
        c, codes = compute_dtype(x.dtype), bitpack.int_dtype(bits + 1)
        biased, fraction = _exponent_and_fraction(x)
        up = keyed_random.fast_uniform(key, x.shape, c) < fraction.to(c).mul_(2.0**-_fraction_bits(x.dtype))
        code = up.to(codes).add_(biased.to(codes)).clamp_max_(high - low + 1)  # in place on what depends on key and x
        return code.bitwise_or_((x < 0).to(codes).bitwise_left_shift_(bits))

    def decode_vector(self, payload: Payload, key: torch.Tensor | None, d: int, dtype: torch.dtype) -> torch.Tensor:
        return self._values(bitpack.unpack(payload["codes"], self.exponent_bits(dtype) + 1, d), dtype)

    def round_trip_vector(self, x: torch.Tensor, key: torch.Tensor) -> tuple[Payload, torch.Tensor]:
        """The values read from the words before packing, where the receiver unpacks them."""
        words = self._words(x, key)
        return {"codes": bitpack.pack(words, self.exponent_bits(x.dtype) + 1)}, self._values(words, x.dtype)

    def _values(self, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The signed powers of two the words stand for, in `dtype`."""
        low, _ = _exponent_range(dtype)
        bits = self.exponent_bits(dtype)
        return _signed_power_of_two(words & ((1 << bits) - 1), words >> bits, low, compute_dtype(dtype)).to(dtype)

    def vector_bytes(self, d: int, dtype: torch.dtype) -> int:
        """d codes of sign + exponent bits, packed."""
        return bitpack.packed_size(d, self.exponent_bits(dtype) + 1)


class PowerSGDParams(Params):
    """Rank-`rank` PowerSGD with `power_iterations` per message; a matrix is compressed only when its rank-r payload
    is at least `min_compression` times smaller than the matrix (0: every matrix)."""

    rank: int = Field(ge=1)
    power_iterations: int = Field(1, ge=1)
    min_compression: float = Field(2.0, ge=0)


def _leaf_paths(tree: Pytree, prefix: str = "") -> Iterator[str]:
    """Each leaf's path ("delta/0.weight"), in `tree_leaves` order: the codec state's keys."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaf_paths(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}"


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The (shape[0], rest) view PowerSGD compresses: a conv kernel's output channels by everything else."""
    return t.reshape(t.shape[0], -1)


class PowerSGD:
    """PowerSGD rank-r compression (Vogels, Karimireddy, Jaggi, NeurIPS 2019), per sender, with warm start.

    Each matrix M (a tensor of ndim > 2 viewed as (shape[0], rest)) keeps its query Q (m x r) as codec state and runs
    `power_iterations` steps of P = M Q, P^ = orthonormal(P) (QR), Q = M^T P^; the payload is P^ and Q, the receiver
    rebuilds P^ Q^T. r is clipped per matrix to min(n, m) (a rank that compresses no matrix is refused); vectors,
    scalars and matrices whose r (n + m) values are not `min_compression` times fewer than n m go as they are. A Q
    that is all zero (the first message, or after an all-zero matrix) is redrawn from the key. This is the paper's
    local form: its all-reduce form sums P over workers before orthonormalizing, an aggregation rather than a
    per-message codec. Error feedback (`error_feedback: true`) is PowerSGD's memory."""

    def __init__(self, params: PowerSGDParams) -> None:
        self.params = params

    def rank(self, t: torch.Tensor) -> int:
        """The rank t is sent at: 0 when it goes as it is."""
        if t.ndim < 2 or not t.is_floating_point():
            return 0
        n, m = t.shape[0], math.prod(t.shape[1:])
        r = min(self.params.rank, n, m)
        return r if r >= 1 and n * m >= self.params.min_compression * r * (n + m) else 0

    def check(self, template: Pytree, field_path: str) -> None:
        """Refuse a rank no matrix of the message can be sent at (every one would go uncompressed)."""
        matrices = [tuple(_as_matrix(t).shape) for t in tree_leaves(template) if t.ndim >= 2 and t.is_floating_point()]
        if not any(self.rank(t) for t in tree_leaves(template)):
            shapes = ", ".join(f"{n}x{m}" for n, m in matrices) or "none"
            raise ScenarioError(
                f"{field_path}.rank: rank {self.params.rank} compresses no matrix of this model (matrices: {shapes}); "
                f"a matrix n x m is compressed when r <= min(n, m) and r (n + m) is at least min_compression "
                f"({self.params.min_compression:g}) times fewer values than n m; lower rank or min_compression")

    def init(self, template: Pytree) -> Pytree:
        """Zero queries, keyed by leaf path, for the compressed matrices: the first message draws them."""
        return {path: t.new_zeros(math.prod(t.shape[1:]), r, dtype=compute_dtype(t.dtype))
                for path, t in zip(_leaf_paths(template), tree_leaves(template), strict=True) if (r := self.rank(t))}

    def _factors(self, matrix: torch.Tensor, q: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P^, Q) after the power iterations from the warm-started q (redrawn from `key` when all zero)."""
        q = torch.where((q == 0).all(), keyed_random.normal(key, 0, q.shape, q.dtype), q)
        for _ in range(self.params.power_iterations):
            p = torch.linalg.qr(matrix @ q).Q
            q = matrix.T @ p
        return p, q

    def shared(self, state: Pytree) -> Pytree:
        """Nothing: P^ and Q both travel, so the receiver needs no query of its own."""
        return {}

    def encode(self, message: Pytree, state: Pytree, key: torch.Tensor, *, first: bool = False) -> tuple[Payload,
                                                                                                         Pytree]:
        paths, indices, new_state = _leaf_paths(message), itertools.count(), {}

        def compress(t: torch.Tensor) -> Payload | torch.Tensor:
            path, i = next(paths), next(indices)
            if not self.rank(t):
                return t
            p, q = self._factors(_as_matrix(t).to(compute_dtype(t.dtype)), state[path], keyed_random.fold_in(key, i))
            new_state[path] = q
            return {"p": p.to(t.dtype), "q": q.to(t.dtype)}

        return tree_map(compress, message), new_state

    def decode(self, payload: Payload, template: Pytree, shared: Pytree) -> tuple[Pytree, Pytree]:
        def rebuild(t: torch.Tensor, sent: Payload | torch.Tensor) -> torch.Tensor:
            if not self.rank(t):
                return sent
            c = compute_dtype(t.dtype)
            return (sent["p"].to(c) @ sent["q"].to(c).T).reshape(t.shape).to(t.dtype)

        return tree_map(rebuild, template, payload), shared

    def round_trip(self, message: Pytree, state: Pytree, key: torch.Tensor, *,
                   first: bool = False) -> tuple[Payload, Pytree, Pytree]:
        payload, new_state = self.encode(message, state, key, first=first)
        return payload, self.decode(payload, message, {})[0], new_state

    def payload_bytes(self, template: Pytree, *, first: bool = False) -> int:
        """r (n + m) values of the matrix's dtype per compressed matrix, every other tensor's own bytes."""
        return sum((r * (t.shape[0] + math.prod(t.shape[1:])) if (r := self.rank(t)) else t.numel()) * t.element_size()
                   for t in tree_leaves(template))
