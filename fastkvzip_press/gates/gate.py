"""Low-rank sink-attention gates (Fast KVzip, arXiv 2601.17668).

One :class:`SinkGate` per attention layer maps each token's post-``input_layernorm`` hidden state to one keep
probability per KV head. For every (token, KV head, group member) a tiny attention runs over ``1 + S`` keys: the
token's own gate key and ``S`` learned, token-independent sink keys. The score is the probability mass on the own
key, averaged over the ``G`` group members. Gates see no positions and no other tokens, so each token is scored once.

:class:`GateBank` holds the gates of all gated layers plus the metadata a gate file needs to be matched to a model.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastkvzip_press.layout import ModelLayout, model_name

logger = logging.getLogger(__name__)

DEFAULT_RANK = 16
DEFAULT_SINKS = 16
MAX_LOGIT_GAP = 80.0  # sink minus own logit; exp(80) times 1024 sinks stays below fp32's largest value
# Rows (sequences x tokens) of hidden states one gate call scores. The gate's fp32 intermediates grow with the rows:
# the hidden states cast to fp32 alone take 16 KB a token at hidden size 4096 (2 GB at 128k tokens), so a long
# prefill is scored in chunks of this many rows (64 MB there); at 4096 rows a chunk's matmul is still large.
SCORE_CHUNK_TOKENS = 4096


class GateMismatchError(ValueError):
    """A gate file or bank does not fit the model it is applied to."""


class RMSNormFP32(nn.Module):
    """RMSNorm that normalises in fp32, rounds to the input dtype, then scales by an fp32 weight.

    This matches the Qwen3 RMSNorm the released gates were trained with: the output is fp32 whenever the
    weight is fp32, whatever the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # nothing to round: one fused call
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class SinkGate(nn.Module):
    """Gate of one attention layer.

    Parameters (names and shapes are those of the released gate files):
        q_proj.weight [H*G*r, D], q_proj.bias [H*G*r], k_proj.weight [H*r, D],
        q_norm.weight [r] (fp32), k_norm.weight [r] (fp32), b [H, 1, G], k_base [H, 1, S, r] (fp32).

    ``forward(x)`` takes hidden states ``[B, N, D]`` and returns keep scores ``[B, H, N]`` in (0, 1), fp32.
    """

    def __init__(
        self,
        hidden_size: int,
        num_kv_heads: int,
        group_size: int,
        rank: int = DEFAULT_RANK,
        n_sink: int = DEFAULT_SINKS,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if n_sink < 1:
            raise ValueError(f"n_sink must be >= 1 (the sink softmax needs sink keys), got {n_sink}")
        self.hidden_size = hidden_size
        self.num_kv_heads = num_kv_heads
        self.group_size = group_size
        self.rank = rank
        self.n_sink = n_sink
        self.q_proj = nn.Linear(hidden_size, num_kv_heads * group_size * rank, bias=True, dtype=dtype)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * rank, bias=False, dtype=dtype)
        self.q_norm = RMSNormFP32(rank)
        self.k_norm = RMSNormFP32(rank)
        self.b = nn.Parameter(torch.zeros(num_kv_heads, 1, group_size, dtype=dtype))
        self.k_base = nn.Parameter(torch.zeros(num_kv_heads, 1, n_sink, rank, dtype=torch.float32))

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised gate queries and keys of hidden states ``x [B, N, D]``.

        Returns:
            queries ``[B, N, H, G, r]`` and keys ``[B, N, H, r]``, fp32. Both projections run as one matmul in the
            weights' dtype (the query bias extended with zeros for the keys).
        """
        bsz, n_tokens, _ = x.shape
        heads, group, rank = self.num_kv_heads, self.group_size, self.rank
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.q_proj.bias.new_zeros(heads * rank)])
        queries, keys = F.linear(x.to(weight.dtype), weight, bias).split([heads * group * rank, heads * rank], -1)
        # The fp32 norm weights make both fp32 for fp32 and half-precision weights (then .float() costs nothing);
        # fp64 weights would give fp64, which the fp32 sink keys cannot meet.
        queries = self.q_norm(queries.view(bsz, n_tokens, heads, group, rank)).float()
        return queries, self.k_norm(keys.view(bsz, n_tokens, heads, rank)).float()

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Own-key and sink logits.

        Args:
            x: hidden states ``[B, N, D]``.

        Returns:
            own ``[B, H, N, G]`` and sinks ``[B, H, N, G, S]``, fp32 (sinks last: the softmax reduces over them). The
            bias ``b`` is added once.
        """
        q, k = self.projections(x)
        scale = 1.0 / math.sqrt(self.rank)
        own = torch.einsum("bnhr,bnhgr->bhng", k, q).mul_(scale).add_(self.b.float().squeeze(1)[None, :, None, :])
        # The scale goes on the S x r sink keys, not on the N x G x S logits.
        sinks = torch.einsum("hsr,bnhgr->bhngs", self.k_base.float().squeeze(1) * scale, q)
        return own, sinks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        own, sinks = self.logits(x)
        # p = exp(own) / (exp(own) + sum_s exp(sink_s)) = 1 / (1 + sum_s exp(sink_s - own)): three passes over the
        # sink logits where a logsumexp takes six. Only exp and arithmetic, which round alike in torch's vectorised
        # and scalar loops (log and sigmoid do not), so equal tokens score bit for bit alike wherever they sit. The
        # clamp keeps the sum finite (p is then below 1e-35) and so the gradient.
        ratios = (sinks - own.unsqueeze(-1)).clamp_(max=MAX_LOGIT_GAP).exp_()  # [B, H, N, G, S]
        return ratios.sum(-1).add_(1).reciprocal_().mean(-1)  # [B, H, N]


@dataclass
class GateMetadata:
    """Everything about a gate bank that its tensors do not say."""

    model_id: str = ""
    layer_ids: tuple[int, ...] = ()
    training: dict[str, Any] = field(default_factory=dict)
    # Models other than ``model_id`` these gates were explicitly accepted for (not saved with the gates).
    accepted_models: tuple[str, ...] = ()


SIBLING_SUFFIXES = ("-instruct", "-chat", "-base", "-it")


def sibling_models(first: str, second: str) -> bool:
    """Whether two model names differ only by a variant suffix (``-Instruct``, ``-Base``, ...): the same base model,
    so gates of one plausibly serve the other."""

    def base(name: str) -> str:
        for suffix in SIBLING_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    return base(model_name(first)) == base(model_name(second))


class GateBank(nn.Module):
    """Gates of all gated layers of one model, indexed by decoder-layer id.

    Attributes:
        gates: one :class:`SinkGate` per gated layer, in layer order.
        metadata: model id, gated layer ids and training information.
    """

    def __init__(self, gates: list[SinkGate], metadata: GateMetadata):
        super().__init__()
        if not gates:
            raise ValueError("a GateBank needs at least one gate")
        if len(metadata.layer_ids) != len(gates):
            raise ValueError(f"{len(gates)} gates but {len(metadata.layer_ids)} layer ids {metadata.layer_ids}")
        first = gates[0]
        for gate in gates[1:]:
            if (gate.hidden_size, gate.num_kv_heads, gate.group_size, gate.rank, gate.n_sink) != (
                first.hidden_size,
                first.num_kv_heads,
                first.group_size,
                first.rank,
                first.n_sink,
            ):
                raise ValueError("all gates of a bank must share hidden size, heads, group size, rank and sinks")
        self.gates = nn.ModuleList(gates)
        self.metadata = metadata
        self._slot = {layer_id: i for i, layer_id in enumerate(metadata.layer_ids)}
        self._finite_versions: tuple | None = None  # see non_finite

    # Shape hyperparameters, shared by all gates.
    hidden_size = property(lambda self: self.gates[0].hidden_size)
    num_kv_heads = property(lambda self: self.gates[0].num_kv_heads)
    group_size = property(lambda self: self.gates[0].group_size)
    rank = property(lambda self: self.gates[0].rank)
    n_sink = property(lambda self: self.gates[0].n_sink)

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.metadata.layer_ids

    def __repr__(self) -> str:
        # One line: presses print their fields (kvpress's evaluation stores str(press) in config.yaml).
        return (
            f"GateBank(model_id={self.metadata.model_id!r}, layers={len(self.gates)}, kv_heads={self.num_kv_heads}, "
            f"group_size={self.group_size}, rank={self.rank}, n_sink={self.n_sink})"
        )

    def has_layer(self, layer_id: int) -> bool:
        return layer_id in self._slot

    def gate(self, layer_id: int) -> SinkGate:
        """The gate of decoder layer ``layer_id``."""
        try:
            return self.gates[self._slot[layer_id]]
        except KeyError:
            raise KeyError(f"layer {layer_id} has no gate; gated layers are {self.layer_ids}") from None

    @torch.no_grad()
    def score(self, layer_id: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Keep scores ``[B, H, N]`` (fp32, in (0, 1)) for hidden states ``[B, N, D]`` of layer ``layer_id``.

        The layer's gate moves to the device of ``hidden_states`` the first time they differ, and only that gate: a
        model spread over several devices keeps each gate beside its layer. Tokens are scored
        :data:`SCORE_CHUNK_TOKENS` rows at a time, so the fp32 intermediates stay bounded however long the prefill.
        The gate scores every token on its own, so the chunks give the scores of one call, bit for bit wherever a
        matrix product rounds each row alike whatever the number of rows (x86 CPUs do, from 12 rows on).
        """
        gate = self.gate(layer_id)
        device = hidden_states.device
        if gate.q_proj.weight.device != device:
            gate.to(device)
        bsz, n_tokens, _ = hidden_states.shape
        step = max(1, SCORE_CHUNK_TOKENS // max(bsz, 1))  # tokens per chunk at most
        if n_tokens <= step:
            return gate(hidden_states)
        # Chunks of equal size, so that none is a few rows: matrix products round a row alike whatever the other rows
        # only above a few rows per call (fp32 on x86 CPUs: from 12 rows on), and for contiguous inputs only (bf16).
        n_chunks = -(-n_tokens // step)
        bounds = [n_tokens * chunk // n_chunks for chunk in range(n_chunks + 1)]
        scores = torch.empty(bsz, gate.num_kv_heads, n_tokens, dtype=torch.float32, device=device)
        for start, end in zip(bounds, bounds[1:]):
            scores[..., start:end] = gate(hidden_states[:, start:end].contiguous())
        return scores

    def as_loaded(self) -> GateBank:
        """This bank in the dtypes a gate file of it loads with: projections and bias ``b`` in the query projection's
        dtype, norm weights and sink keys in fp32 (the gate's sink softmax runs in fp32).

        A bank cast whole in memory (``bank.to(torch.bfloat16)``) holds half-precision norms and sink keys, which the
        gate cannot mix with its fp32 ones. Returns ``self`` when nothing needs casting, else a new bank on the same
        devices and with the same metadata object; ``self`` is left as it is.
        """
        if all(
            tensor.dtype == torch.float32
            for gate in self.gates
            for tensor in (gate.q_norm.weight, gate.k_norm.weight, gate.k_base)
        ):
            return self
        gates = []
        for gate in self.gates:
            shape = (gate.hidden_size, gate.num_kv_heads, gate.group_size, gate.rank, gate.n_sink)
            with torch.device(gate.q_proj.weight.device):
                loaded = SinkGate(*shape, dtype=gate.q_proj.weight.dtype)
            loaded.load_state_dict(gate.state_dict())  # casts each tensor into the new gate's dtype, as loading does
            gates.append(loaded)
        return GateBank(gates, self.metadata)

    @classmethod
    def random(
        cls,
        layout: ModelLayout,
        rank: int = DEFAULT_RANK,
        n_sink: int = DEFAULT_SINKS,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> GateBank:
        """Untrained gates with random projections and sink keys, for tests and demos without trained gates."""
        generator = torch.Generator().manual_seed(seed)
        gates = []
        for _ in layout.gated_layer_ids:
            gate = SinkGate(layout.hidden_size, layout.num_kv_heads, layout.group_size, rank, n_sink, dtype)
            with torch.no_grad():
                for name, param in gate.named_parameters():
                    if "norm" in name:
                        continue  # norm weights keep their ones, as at the start of training
                    std = 1.0 / math.sqrt(layout.hidden_size) if name.endswith("_proj.weight") else 1.0
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
            gates.append(gate)
        meta = GateMetadata(layout.model_id, layout.gated_layer_ids, {"source": "random", "seed": seed})
        return cls(gates, meta)

    def digest(self) -> str:
        """A short hash of the gates' layer ids and weights: equal banks, equal digests (metadata aside)."""
        sha = hashlib.sha256(repr(tuple(self.layer_ids)).encode())
        for gate in self.gates:
            for key, value in gate.state_dict().items():
                tensor = value.detach().cpu().contiguous()
                sha.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                sha.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return sha.hexdigest()[:16]

    def non_finite(self) -> list[str]:
        """Names ``layer <id> <parameter>`` of the parameters that hold NaN or infinite values."""
        # A press checks its bank on every entry (8 ms for the default model's gates, 1 % of a 512-token prefill), so
        # a bank found finite is not read again until a tensor moves or is written in place (its version counter).
        try:
            versions = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        except RuntimeError:  # inference tensors keep no version counter: check them every time
            versions = None
        if versions is not None and versions == self._finite_versions:
            return []
        bad = [
            f"layer {layer_id} {key}"
            for layer_id, gate in zip(self.layer_ids, self.gates)
            for key, value in gate.state_dict().items()
            if not bool(torch.isfinite(value).all())
        ]
        self._finite_versions = None if bad else versions
        return bad

    def check_model(self, layout: ModelLayout, allow_other_model: bool = False) -> None:
        """Raise :class:`GateMismatchError` when the gates were made for another model than ``layout``'s.

        Same-shaped models (two fine-tunes, a base model and its instruct variant) would load each other's gates
        silently. Ids that differ only by a variant suffix (``-Instruct``, ``-Base``) get a warning; others are
        refused unless ``allow_other_model`` (then a warning, and the model is remembered as accepted). Gates or
        models without an id cannot be checked.
        """
        ours, theirs = self.metadata.model_id, layout.model_id
        if not ours or not theirs or model_name(ours) == model_name(theirs) or theirs in self.metadata.accepted_models:
            return
        if not allow_other_model and not sibling_models(ours, theirs):
            raise GateMismatchError(
                f"these gates were trained for model {ours!r}, not {theirs!r} (same shapes, so they would load). "
                f"Train gates for {theirs!r} with `fastkvzip-press train`, or, if it is a fine-tune of {ours!r} and "
                "you mean to reuse them, pass --allow-other-model on the command line (allow_other_model=True to "
                "load_gates in Python)."
            )
        logger.warning("gates trained for %r are used on model %r", ours, theirs)
        self.metadata.accepted_models = (*self.metadata.accepted_models, theirs)

    def check_fits(self, layout: ModelLayout) -> None:
        """Raise :class:`GateMismatchError` naming expected and found shapes when the bank does not fit ``layout``."""
        problems = []
        expected = {
            "hidden size": layout.hidden_size,
            "KV heads": layout.num_kv_heads,
            "group size (query heads per KV head)": layout.group_size,
            "gated layers": len(layout.gated_layer_ids),
        }
        found = {
            "hidden size": self.hidden_size,
            "KV heads": self.num_kv_heads,
            "group size (query heads per KV head)": self.group_size,
            "gated layers": len(self.gates),
        }
        for name, want in expected.items():
            if found[name] != want:
                problems.append(f"{name}: model expects {want}, gates have {found[name]}")
        if not problems and tuple(self.layer_ids) != tuple(layout.gated_layer_ids):
            problems.append(f"gated layer ids: model expects {layout.gated_layer_ids}, gates have {self.layer_ids}")
        if problems:
            raise GateMismatchError(
                f"gates for {self.metadata.model_id or 'an unnamed model'} do not fit model "
                f"{layout.model_id or '(unnamed)'}: "
                + "; ".join(problems)
                + ". Load gates trained for this model, or train some with `fastkvzip-press train`."
            )
