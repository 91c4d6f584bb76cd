"""GPU check of the SeqKD bridge (run by hand on a device; numbers in docs/DISTILLATION.md, "SeqKD bridge"):

    PYTHONPATH=. python3 bench/gpu_check_bridge.py GPT2_TOKENIZER_DIR DOLLY_JSONL [OUT_DIR]

A tiny random Llama source (character vocabulary: SmolLM2's weights cannot travel to the device machine) answers
Dolly prompts on the GPU; a fresh GPT-2 bridge with GPT-2's tokenizer learns them (bf16 autocast); one pruned anchor
follows. A second chain from the same source and prompts reuses the cached answers (no generation stage).
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tiny_model  # noqa: E402

from cbd_engine.pipelines.chain import build_chain  # noqa: E402


def spec(source: Path, tokenizer: Path, data: Path, epochs: float) -> dict:
    return {"name": "gpu", "source": str(source), "device": "gpu",
            "bridge": {"model": {"family": "gpt2", "num_layers": 4, "hidden_size": 512, "num_heads": 8,
                                 "intermediate_size": 2048},
                       "tokenizer": str(tokenizer), "method": "seqkd", "num_samples": 512,
                       "epochs": epochs, "learning_rate": 1e-3,
                       "generation": {"max_new_tokens": 64, "batch_size": 64, "max_length": 512}},
            "anchors": [{"shape": {"num_layers": 2, "hidden_size": 256, "num_heads": 4, "num_kv_heads": 4,
                                   "head_dim": 64, "intermediate_size": 1024}}],
            "dataset": {"path": str(data)},
            "distillation": {"steps": 20, "batch_size": 16, "max_length": 512, "eval_rows": 64}}


def main() -> None:
    tokenizer, data = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    out = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/gpu-bridge")
    os.environ["CBD_GENERATIONS_DIR"] = str(out / "generations")
    source = make_tiny_model(out / "source", "llama", seed=0, max_position_embeddings=1024, hidden_size=256,
                             intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64)
    for name, epochs in (("first", 3), ("second", 0.1)):
        stages: set[str] = set()
        started = time.monotonic()
        result = build_chain(spec(source, tokenizer, data, epochs), out / name,
                             progress=lambda e, seen=stages: seen.add(e.stage))
        lineage = json.loads((result.anchors[0].path / "cbd.json").read_text())["distillation"]
        print(json.dumps({name: {"seconds": round(time.monotonic() - started, 1), "stages": sorted(stages),
                                 "generations": lineage["generations"], "bf16": lineage["config"]["bf16"],
                                 "anchors": [{"params": a.params, **a.metrics} for a in result.anchors]}},
                         indent=1), flush=True)


if __name__ == "__main__":
    main()
