import math

import pytest
import torch

from fastkvzip_press import GateBank, GateMismatchError, ModelLayout, SinkGate
from fastkvzip_press.gates.gate import GateMetadata


@torch.no_grad()
def reference_scores(gate: SinkGate, x: torch.Tensor) -> torch.Tensor:
    """Direct recomputation of the paper's formula, one (token, head, group member) at a time."""
    bsz, n_tokens, _ = x.shape
    heads, group, rank = gate.num_kv_heads, gate.group_size, gate.rank
    out = torch.zeros(bsz, heads, n_tokens, dtype=torch.float64)
    w_q, b_q, w_k = gate.q_proj.weight.double(), gate.q_proj.bias.double(), gate.k_proj.weight.double()
    g_q, g_k = gate.q_norm.weight.double(), gate.k_norm.weight.double()

    def rms(v, weight):
        return v / torch.sqrt((v * v).mean() + 1e-6) * weight

    for b in range(bsz):
        for n in range(n_tokens):
            q_all = (w_q @ x[b, n].double() + b_q).view(heads, group, rank)
            k_all = (w_k @ x[b, n].double()).view(heads, rank)
            for h in range(heads):
                k = rms(k_all[h], g_k)
                total = 0.0
                for g in range(group):
                    q = rms(q_all[h, g], g_q)
                    own = float(k @ q) / math.sqrt(rank) + float(gate.b[h, 0, g])
                    sinks = [float(gate.k_base[h, 0, s].double() @ q) / math.sqrt(rank) for s in range(gate.n_sink)]
                    total += 1.0 / (1.0 + sum(math.exp(s - own) for s in sinks))
                out[b, h, n] = total / group
    return out


def random_gate(seed=0, **kwargs) -> SinkGate:
    layout = ModelLayout("m", 1, kwargs.get("hidden", 24), 6, 2, 8, (0,))
    bank = GateBank.random(layout, rank=kwargs.get("rank", 4), n_sink=kwargs.get("n_sink", 3), seed=seed)
    return bank.gates[0]


def test_gate_matches_direct_recomputation():
    gate = random_gate()
    x = torch.randn(2, 5, 24)
    got = gate(x)
    assert got.shape == (2, 2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_scores(gate, x), atol=1e-5, rtol=1e-4)


def test_sinks_far_above_the_own_key_give_finite_scores_and_gradients():
    """A sink logit hundreds above the own logit (a diverging fit) scores ~0, not NaN, and trains on."""
    gate = random_gate(seed=6)
    with torch.no_grad():
        gate.k_base.mul_(1e4)
    x = torch.randn(2, 5, 24)
    scores = gate(x)
    assert torch.all(torch.isfinite(scores)) and torch.all((scores >= 0) & (scores <= 1))
    assert float(scores.min()) < 1e-30  # some group member is swamped by a sink
    scores.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gate.parameters() if p.grad is not None)


def test_scores_are_probabilities_and_batch_independent():
    gate = random_gate(seed=1)
    x = torch.randn(3, 7, 24) * 5
    scores = gate(x)
    assert torch.all((scores > 0) & (scores < 1))
    for b in range(3):
        torch.testing.assert_close(gate(x[b : b + 1]), scores[b : b + 1])


def test_bias_is_added_once():
    gate = random_gate(seed=2)
    x = torch.randn(1, 4, 24)
    own, _ = gate.logits(x)
    with torch.no_grad():
        gate.b.add_(1.0)
    own_shifted, _ = gate.logits(x)
    torch.testing.assert_close(own_shifted - own, torch.ones_like(own))


def test_bf16_gate_normalises_in_fp32():
    gate = random_gate(seed=3)
    gate_bf16 = random_gate(seed=3)
    gate_bf16.q_proj.to(torch.bfloat16)
    gate_bf16.k_proj.to(torch.bfloat16)
    gate_bf16.b.data = gate_bf16.b.data.to(torch.bfloat16)
    x = torch.randn(1, 6, 24)
    scores = gate_bf16(x)
    assert scores.dtype == torch.float32  # fp32 norm weights and sink keys make the rest fp32
    torch.testing.assert_close(scores, gate(x), atol=0.03, rtol=0.1)


def test_gate_needs_sinks():
    with pytest.raises(ValueError, match="n_sink"):
        SinkGate(8, 1, 1, 4, 0)


def test_bank_indexes_by_layer_id_and_checks_fit(tiny_models):
    model, _ = tiny_models("gemma3")
    layout = ModelLayout.from_model(model)
    assert layout.gated_layer_ids == (2, 5)  # sliding layers carry no gate
    bank = GateBank.random(layout)
    assert bank.has_layer(5) and not bank.has_layer(0)
    with pytest.raises(KeyError, match="no gate"):
        bank.gate(0)
    bank.check_fits(layout)
    other = ModelLayout("other", 4, 64, 4, 1, 16, (0, 1, 2, 3))
    with pytest.raises(GateMismatchError, match=r"KV heads: model expects 1, gates have 2"):
        bank.check_fits(other)


@pytest.mark.parametrize("n_repeats", [7, 20, 203])
def test_equal_tokens_get_equal_scores_wherever_they_sit(n_repeats):
    """Eviction breaks exact ties by position, so equal hidden states (a repeated token at the first layer) must
    score bit for bit the same at every position and batch size, or a batch evicts other pairs than alone."""
    gate = random_gate(seed=2, hidden=64, rank=16, n_sink=16)
    tokens = torch.randn(1, 5, 64) * 3
    x = tokens.repeat(1, n_repeats, 1)
    scores = gate(torch.cat([x, torch.randn(2, x.shape[1], 64)]))[0]  # [H, 5 * n_repeats], within a batch
    alone = gate(x)[0]
    for token in range(5):
        same = torch.cat([scores[:, token::5], alone[:, token::5]], 1)
        assert torch.equal(same, same[:, :1].expand_as(same))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_round_like_the_released_gates(dtype):
    """The gate norms normalise in fp32, round to the input dtype, then scale by their fp32 weight."""
    gate = random_gate(seed=4)
    with torch.no_grad():
        gate.q_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, gate.rank).to(dtype)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + gate.q_norm.eps)).to(dtype)
    torch.testing.assert_close(gate.q_norm(x), gate.q_norm.weight * normed, rtol=1e-6, atol=1e-6)


def test_one_matmul_serves_both_projections():
    gate = random_gate(seed=5)
    x = torch.randn(2, 6, 24)
    queries, keys = gate.projections(x)
    heads, group, rank = gate.num_kv_heads, gate.group_size, gate.rank
    torch.testing.assert_close(queries, gate.q_norm(gate.q_proj(x).view(2, 6, heads, group, rank)))
    torch.testing.assert_close(keys, gate.k_norm(gate.k_proj(x).view(2, 6, heads, rank)))


def test_a_bank_found_finite_is_checked_again_after_a_write():
    """The finiteness check is skipped for an unchanged bank, never for one written in place or given new tensors."""
    bank = GateBank([random_gate(seed=1), random_gate(seed=2)], GateMetadata(layer_ids=(0, 1)))
    assert bank.non_finite() == [] and bank.non_finite() == []
    with torch.no_grad():
        bank.gate(1).k_base[0, 0, 0, 0] = float("nan")
    assert bank.non_finite() == ["layer 1 k_base"]
    with torch.no_grad():
        bank.gate(1).k_base[0, 0, 0, 0] = 0.0
    assert bank.non_finite() == []
    bank.gate(0).b.data = torch.full_like(bank.gate(0).b, float("inf"))
    assert bank.non_finite() == ["layer 0 b"]
