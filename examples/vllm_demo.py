"""Fast KVzip inside vLLM (offline ``vllm.LLM``) on the default model: the same questions about one context with
and without compression, and what each request stored.

    make vllm-demo                      # the default model, ratio 0.5, fp32 on CPU
    .venv-vllm/bin/python examples/vllm_demo.py --context-file F --question Q [--question Q2] [--ratio 0.75]

Each request's prompt (the context and its question) is compacted after its prefill with one budget over all layers
and KV heads: each head keeps its own number of pairs in vLLM's memory, and the blocks past them go back to the pool.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from fastkvzip_press.vllm.events import read_events
from fastkvzip_press.vllm.settings import check_request_ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context-file", required=True, help="a UTF-8 text file")
    parser.add_argument("--question", action="append", required=True, help="repeat for several questions")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of each prompt's KV pairs evicted")
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model folder")
    parser.add_argument("--gates", default=None, help="gate file or folder (default: the shipped gates)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    try:
        check_request_ratio(args.ratio)
    except ValueError as error:
        parser.error(f"--ratio: {error}")
    if not Path(args.context_file).is_file():
        parser.error(f"--context-file {args.context_file} is not a file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from fastkvzip_press.models import default_model_dir

    model = str(default_model_dir()) if args.model == "default" else args.model
    context = Path(args.context_file).read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{context}\n\n{question}"}], add_generation_prompt=True, tokenize=True
        )
        for question in args.question
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    events = Path(tempfile.mkdtemp(prefix="fastkvzip-vllm-")) / "events.jsonl"
    section = {"events": str(events), **({"gates": args.gates} if args.gates else {})}
    llm = LLM(
        model=model,
        dtype="float32",  # vLLM's bf16 CPU path answers wrongly on AMX CPUs
        enforce_eager=True,
        enable_prefix_caching=False,
        max_model_len=max(len(p) for p in prompts) + args.max_new_tokens,
        additional_config={"fastkvzip": section},
    )
    for ratio in (0.0, args.ratio):
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0, extra_args={"fastkvzip_ratio": ratio})
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        compactions = {e["prompt_tokens"]: e for e in read_events(events, "compaction")}
        print(f"\n=== ratio {ratio} ===")
        for question, prompt, output in zip(args.question, prompts, outputs):
            print(f"Q: {question}\nA: {output.outputs[0].text.strip()}")
            record = compactions.get(len(prompt)) if ratio else None
            if record:
                heads = record["heads"]
                print(
                    f"   {record['prompt_tokens']} prompt tokens, {record['kept_pairs']} of "
                    f"{record['prompt_tokens'] * heads} pairs kept over {heads} layers x KV heads; "
                    f"blocks {record['blocks_before']} -> {record['blocks_after']}"
                )
            else:
                print(f"   {len(prompt)} prompt tokens, all kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
