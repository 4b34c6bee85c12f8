"""The scheduler's block counts against the worker's single-head blocks, without vLLM: random arrivals, lengths,
ratios, budgets, chunking, preemptions and finishes never let the worker's heads need more single-head blocks than
the scheduler's blocks stand for, and every block comes back."""

import numpy as np
import pytest
import torch

from fastkvzip_press.paged import HeadBlockPool, HeadTables
from fastkvzip_press.vllm.accounting import SchedulerAccounts
from fastkvzip_press.vllm.compaction import PromptCompaction
from fastkvzip_press.vllm.settings import EngineSettings

LAYERS, KV_HEADS, BLOCK = 3, 2, 8
HEADS = LAYERS * KV_HEADS


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Simulation:
    """A scheduler pool of ``blocks`` blocks and a worker pool of ``blocks x layers x heads`` single-head blocks."""

    def __init__(self, blocks: int, settings: EngineSettings, seed: int):
        self.free = blocks
        self.capacity = blocks
        self.accounts = SchedulerAccounts(settings, HEADS, BLOCK)
        self.pool = HeadBlockPool(blocks * HEADS)
        self.tables = HeadTables(self.pool, 64, LAYERS, KV_HEADS, 200, BLOCK)
        self.held: dict[str, int] = {}
        self.state: dict[str, dict] = {}
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def admit(self, name: str, prompt: int, answer: int, extra_args: dict) -> None:
        self.state[name] = dict(prompt=prompt, answer=answer, extra=extra_args, computed=0, compaction=None)
        self.held[name] = 0

    def release(self, name: str) -> None:
        self.free += self.held.pop(name)
        self.accounts.forget(name)
        self.tables.close(name)

    def step(self, name: str, budget: int) -> bool:
        """One scheduler step of ``name`` with at most ``budget`` tokens; False when the pool cannot hold it."""
        state = self.state[name]
        account = self.accounts.account(name, state["prompt"], state["extra"])
        total = state["prompt"] + state["answer"]
        new = min(budget, total - state["computed"]) if state["computed"] < state["prompt"] else 1
        new = self.accounts.step_tokens(name, state["computed"], new)
        need = cdiv(self.accounts.counted_tokens(name, state["computed"] + new), BLOCK) - self.held[name]
        if need > self.free:
            return False
        self.free -= max(need, 0)
        self.held[name] += max(need, 0)
        slot = self.tables.slot(name)
        self.tables.grow(np.array([slot]), np.array([new]))  # the forward writes every head
        if account.schedule is not None and state["computed"] < state["prompt"]:
            if state["compaction"] is None:
                state["compaction"] = PromptCompaction(account.schedule)
            scores = torch.rand(LAYERS, KV_HEADS, new, generator=self.generator)
            result = state["compaction"].add(scores)
            if result is not None:
                self.tables.shrink(slot, result[1].stored.numpy())
        state["computed"] += new
        if self.accounts.passed_points(name, state["computed"]):
            keep = self.accounts.blocks_after(name, state["computed"], self.held[name])
            self.free += self.held[name] - keep
            self.held[name] = keep
        assert self.tables.blocks_held(slot) <= HEADS * self.held[name], "the worker's pool is oversubscribed"
        return True


@pytest.mark.parametrize("chunk_size", [None, 48])
@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_never_oversubscribes_the_worker_pool(chunk_size, seed):
    settings = EngineSettings(chunk_size=chunk_size, window_size=0.05)
    sim = Simulation(blocks=60, settings=settings, seed=seed)
    rng = sim.rng
    waiting = [f"r{i}" for i in range(30)]
    running: list[str] = []
    preempted = finished = 0
    for name in waiting:
        extra = {"fastkvzip_ratio": float(rng.choice([0.0, 0.5, 0.75, 0.9])),
                 "fastkvzip_budget": str(rng.choice(["global", "uniform"]))}  # fmt: skip
        sim.admit(name, int(rng.integers(20, 300)), int(rng.integers(1, 40)), extra)
    while waiting or running:
        if waiting and len(running) < 6 and rng.random() < 0.5:
            running.append(waiting.pop())
        for name in list(running):
            if name not in running:
                continue
            while not sim.step(name, budget=int(rng.integers(8, 64))):
                victim = running.pop()  # vLLM preempts the latest request and recomputes it later
                sim.release(victim)
                state = sim.state[victim]
                sim.admit(victim, state["prompt"], state["answer"], state["extra"])
                waiting.append(victim)
                preempted += 1
                if victim == name:
                    break
            state = sim.state.get(name)
            if name in running and state["computed"] >= state["prompt"] + state["answer"]:
                running.remove(name)
                sim.release(name)
                finished += 1
    assert finished == 30 and preempted > 0
    assert sim.free == sim.capacity and sim.pool.num_free == sim.pool.capacity, "every block comes back"


def test_a_request_kept_whole_by_its_protection_is_said_once(caplog):
    accounts = SchedulerAccounts(EngineSettings(window_size=500), HEADS, BLOCK)
    accounts.account("a", 300, {"fastkvzip_ratio": 0.5})
    accounts.account("b", 200, {"fastkvzip_ratio": 0.5})
    accounts.account("c", 900, {"fastkvzip_ratio": 0.5})  # long enough: compacted
    assert caplog.text.count("kept whole") == 1 and "window_size=500" in caplog.text
    assert accounts.counted_tokens("a", 300) == 300
