"""DistillKit's compressed top-k rows, decoded: `compressed_logprobs` (bytes per row) and `bytepacked_indices` (ids of
ceil(log2 d) bits each), as its logit capture writes them with a `DistributionQuantizationConfig` (saved beside the
parquet files as compression_config.yaml). The bytes carry no settings: the config that wrote them must be given.

The layout (arcee-ai/DistillKit, distillkit/compression/monotonic_logprobs.py and bitpack.py), per row, the k
log-probs sorted most probable first:
- `exact_k` values in `exact_dtype` (little-endian), then one coefficient per polynomial term in `term_dtype`;
- per residual bin: its scale (one `scale_dtype` value), then `num_elements` unsigned ints of `element_bits` bits,
  packed most significant bit first into whole bytes; a value q stands for (q - 2^(bits-1)) * scale (for one bit,
  (2q - 1) * scale);
- the remaining k - exact_k values are the polynomial at t = 0, 1, ... (or k - exact_k points in [0, 1] with
  `normalize_t`) plus the residuals (zero past the bins);
- with `delta_encoding` the values are differences from the previous one (the first as is): their running sum.
The arithmetic below follows DistillKit's decoder step for step (the same dtypes in the same order), so a row decodes
to the values DistillKit itself trains on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
SPECIAL_TERMS = {"sqrt": torch.sqrt, "exp": torch.exp}
CONFIG_FILE = "compression_config.yaml"  # what DistillKit's capture writes beside its parquet files


@dataclass(frozen=True)
class ResidualBin:
    scale_dtype: torch.dtype
    element_bits: int
    num_elements: int

    @property
    def nbytes(self) -> int:
        return _bytes(self.scale_dtype) + (self.element_bits * self.num_elements + 7) // 8


@dataclass(frozen=True)
class CompressionConfig:
    """DistillKit's `DistributionQuantizationConfig`: vocabulary `d`, `k` log-probs per row, the first `exact_k`
    stored as is, the rest a polynomial over `terms` plus quantized residuals."""

    d: int
    k: int
    exact_k: int
    exact_dtype: torch.dtype = torch.float32
    terms: tuple = ()
    term_dtype: torch.dtype = torch.float32
    bins: tuple = ()
    delta_encoding: bool = True
    normalize_t: bool = False

    @classmethod
    def from_mapping(cls, mapping: dict) -> CompressionConfig:
        """From DistillKit's config keys: the compression_config.yaml its capture writes, or a training config's
        `logprob_compressor` (top level or under `teacher`)."""
        mapping = mapping.get("teacher", mapping) or {}
        mapping = mapping.get("logprob_compressor", mapping) or {}
        missing = [name for name in ("d", "k", "exact_k") if name not in mapping]
        if missing:
            raise ValueError(f"the DistillKit compression config lacks {missing} (it needs d, k, exact_k and the "
                             f"settings the rows were written with)")
        try:
            bins = tuple(ResidualBin(_dtype(b.get("scale_dtype")), int(b["element_bits"]), int(b["num_elements"]))
                         for b in mapping.get("residual_bins") or [])
            terms = tuple(t if isinstance(t, int) else str(t) for t in mapping.get("polynomial_terms") or [])
            config = cls(d=int(mapping["d"]), k=int(mapping["k"]), exact_k=int(mapping["exact_k"]),
                         exact_dtype=_dtype(mapping.get("exact_dtype", "float32")), terms=terms,
                         term_dtype=_dtype(mapping.get("term_dtype", "float32")), bins=bins,
                         delta_encoding=bool(mapping.get("delta_encoding", True)),
                         normalize_t=bool(mapping.get("normalize_t", False)))
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"the DistillKit compression config's residual_bins are malformed ({error!r}): each "
                             "needs scale_dtype, element_bits and num_elements") from error
        config.check()
        return config

    def check(self) -> None:
        if not 0 <= self.exact_k <= self.k or self.d < 2:
            raise ValueError(f"the DistillKit compression config needs d >= 2 and 0 <= exact_k <= k, got d={self.d}, "
                             f"k={self.k}, exact_k={self.exact_k}")
        unknown = [term for term in self.terms if not isinstance(term, int) and term not in SPECIAL_TERMS]
        if unknown:
            raise ValueError(f"polynomial_terms {unknown} are neither powers (ints) nor one of {sorted(SPECIAL_TERMS)}")
        if sum(b.num_elements for b in self.bins) > self.k - self.exact_k:
            raise ValueError("the residual bins hold more values than k - exact_k")
        if any(not 1 <= b.element_bits <= 64 for b in self.bins):
            raise ValueError("residual bins' element_bits must lie in [1, 64]")

    @property
    def index_bits(self) -> int:
        # DistillKit takes ceil(log2(d)) in float32; the same computation, so that a d it rounds agrees.
        return int(torch.log2(torch.tensor(self.d, dtype=torch.float32)).ceil().item())

    @property
    def logprob_bytes(self) -> int:
        return self.exact_k * _bytes(self.exact_dtype) + len(self.terms) * _bytes(self.term_dtype) + \
            sum(b.nbytes for b in self.bins)

    @property
    def index_bytes(self) -> int:
        return (self.k * self.index_bits + 7) // 8


def load_config(path) -> CompressionConfig:
    """A DistillKit compression config from a .yaml/.json file, or from the compression_config.yaml in a folder."""
    import yaml  # a dependency of datasets

    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"no DistillKit compression config at {path}: pass the compression_config.yaml its capture "
                         "wrote (or the training config with logprob_compressor)")
    return CompressionConfig.from_mapping(yaml.safe_load(path.read_text()) or {})


def decode_indices(data, config: CompressionConfig) -> torch.Tensor:
    """`bytepacked_indices` [rows, bytes] (uint8) -> ids [rows, k] int64."""
    data = _byte_rows(data, config.index_bytes, "bytepacked_indices")
    return torch.from_numpy(unpack_bits(data, config.index_bits, config.k))


def decode_logprobs(data, config: CompressionConfig) -> torch.Tensor:
    """`compressed_logprobs` [rows, bytes] (uint8) -> log-probs [rows, k] float32, most probable first."""
    data = torch.from_numpy(_byte_rows(data, config.logprob_bytes, "compressed_logprobs"))
    rows, offset = data.shape[0], 0

    def take(count: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal offset
        size = count * _bytes(dtype)
        if size == 0:
            return torch.zeros(rows, 0, dtype=dtype)
        values = data[:, offset:offset + size].clone().view(dtype).reshape(rows, count)
        offset += size
        return values

    out_dtype = config.exact_dtype  # DistillKit decodes into the exact values' dtype
    exact = take(config.exact_k, config.exact_dtype)
    coeffs = take(len(config.terms), config.term_dtype) if config.terms else None
    residuals = []
    for residual_bin in config.bins:
        scale = take(1, residual_bin.scale_dtype)
        size = (residual_bin.element_bits * residual_bin.num_elements + 7) // 8
        packed = data[:, offset:offset + size].numpy()
        offset += size
        levels = torch.from_numpy(unpack_bits(packed, residual_bin.element_bits, residual_bin.num_elements))
        residuals.append(_dequantized(levels, scale, residual_bin.element_bits))
    approx_count = config.k - config.exact_k
    if residuals:
        residual = torch.cat(residuals, -1)
        residual = torch.nn.functional.pad(residual, (0, approx_count - residual.shape[-1]))
    else:
        residual = torch.zeros(rows, approx_count, dtype=out_dtype)
    approx = residual.to(out_dtype)
    if coeffs is not None:
        fit = (_term_columns(config, approx_count).to(coeffs.dtype) * coeffs.unsqueeze(-2)).sum(-1)
        approx = fit + approx
    values = torch.cat([exact.to(out_dtype), approx], -1)
    if config.delta_encoding:
        values = values.float().cumsum(-1).to(out_dtype)
    return values.to(torch.float32)


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """[rows, bytes] uint8 -> [rows, count] int64: `count` unsigned ints of `bits` bits, most significant first."""
    if data.shape[-1] * 8 < bits * count:
        raise ValueError(f"{data.shape[-1]} bytes cannot hold {count} values of {bits} bits")
    stream = np.unpackbits(data, axis=-1)[..., :bits * count].reshape(*data.shape[:-1], count, bits)
    values = np.zeros(stream.shape[:-1], dtype=np.uint64)
    for bit in range(bits):
        values = (values << np.uint64(1)) | stream[..., bit].astype(np.uint64)
    return values.astype(np.int64)


def _dequantized(levels: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 1:
        return (levels.to(torch.float32) * 2.0 - 1.0) * scale
    return (levels - 2 ** (bits - 1)).to(torch.float32) * scale


def _term_columns(config: CompressionConfig, count: int) -> torch.Tensor:
    if config.normalize_t:
        t = torch.linspace(0, 1, steps=count, dtype=config.term_dtype)
    else:
        t = torch.arange(count, dtype=config.term_dtype)
    return torch.stack([t ** term if isinstance(term, int) else SPECIAL_TERMS[term](t) for term in config.terms], -1)


def _byte_rows(data, width: int, column: str) -> np.ndarray:
    """A row list of byte lists (or an array) as a [rows, width] uint8 array, each row checked for its width."""
    if isinstance(data, torch.Tensor):
        data = data.numpy()
    try:
        array = np.array(data, dtype=np.int64)  # a copy, writable, whatever the ints were
    except (ValueError, TypeError) as error:
        raise ValueError(f"{column} must be one list of bytes per row, all of one length ({error})") from error
    if array.ndim != 2 or (array.size and (array.min() < 0 or array.max() > 255)):
        raise ValueError(f"{column} must be [rows, bytes] of values in [0, 255], got shape {array.shape}")
    if array.shape[1] != width:
        raise ValueError(f"{column} holds {array.shape[1]} bytes per row but the compression config implies {width}: "
                         "the rows were written with another config")
    return array.astype(np.uint8)


def _dtype(name) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of DistillKit's {sorted(DTYPES)}")
    return DTYPES[name]


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8

