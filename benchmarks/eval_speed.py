"""Examples/second of exact_match: teacher-forced (one forward pass) versus true greedy generation.

Both modes score the same examples on the same model and must give the same accuracy. By default the model is
a random Llama of the demo's size (hidden 64, 4 layers; accuracy ~0, which does not change the cost: greedy
decoding always runs to the longest answer + EOS) on 5-digit reverse examples (answers of 5 tokens + EOS);
``--model DIR --data FILE`` uses a saved model and a JSONL file instead.

    OMP_NUM_THREADS=1 python benchmarks/eval_speed.py [--examples 256] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mergesearch.config import ObjectiveConfig
from mergesearch.objectives import ObjectiveContext, build_objectives

RESULT = Path(__file__).parent / "results" / "eval_speed.json"


def demo_model() -> tuple[Any, Any]:
    """A random Llama with the demo's shape and tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergesearch.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(["<reverse>", "<swap>", "<sort>"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def reverse_data(path: Path, n: int) -> Path:
    """``n`` reverse examples of 5 digits (5 answer tokens)."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            d = [str(rng.randrange(10)) for _ in range(5)]
            f.write(json.dumps({"prompt": f"<reverse> {' '.join(d)} =", "answer": " ".join(d[::-1])}) + "\n")
    return path


def timed(objective: Any, model: Any, tok: Any, repeats: int) -> tuple[float, float]:
    """(accuracy, median seconds) over ``repeats`` calls after one warm-up call."""
    acc = objective(model, tok)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        objective(model, tok)
        times.append(time.perf_counter() - t0)
    return acc, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved HF model folder (default: random demo-size Llama)")
    parser.add_argument("--data", type=Path, help="prompt/answer JSONL (default: 5-digit reverse examples)")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tok = AutoModelForCausalLM.from_pretrained(args.model).eval(), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok = demo_model()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or reverse_data(Path(tmp) / "reverse.jsonl", args.examples)
        common = {"type": "exact_match", "data": data, "limit": args.examples, "batch_size": args.batch_size}
        forced, generated = build_objectives(
            [ObjectiveConfig.model_validate({**common, "name": "forced"}),
             ObjectiveConfig.model_validate({**common, "name": "generate", "mode": "generate"})],
            ObjectiveContext(),
        )
        acc_f, t_f = timed(forced, model, tok, args.repeats)
        acc_g, t_g = timed(generated, model, tok, args.repeats)
    n = len(forced.examples)
    answer_tokens = [len(a) for _, a in forced.encoded(tok)]
    result = {
        "model": str(args.model or "random demo-size Llama (hidden 64, 4 layers)"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": n,
        "answer_tokens_incl_eos": {"min": min(answer_tokens), "max": max(answer_tokens)},
        "batch_size": args.batch_size,
        "threads": args.threads,
        "teacher_forced": {"accuracy": acc_f, "seconds": t_f, "examples_per_s": n / t_f},
        "generate": {"accuracy": acc_g, "seconds": t_g, "examples_per_s": n / t_g},
        "speedup": t_g / t_f,
        "same_accuracy": acc_f == acc_g,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(f"exact_match on {n} examples, answers {min(answer_tokens)}-{max(answer_tokens)} tokens incl. EOS:")
    print(f"  teacher-forced {n / t_f:9.1f} examples/s (accuracy {acc_f:.3f})")
    print(f"  generate       {n / t_g:9.1f} examples/s (accuracy {acc_g:.3f})")
    print(f"  ratio          {t_g / t_f:9.1f}x")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {RESULT}")


if __name__ == "__main__":
    main()
