"""The README.md every model is published with: a Hugging Face model card (YAML metadata the Hub and its tools read,
then text). Built with huggingface_hub's ModelCard, so the metadata is the Hub's own schema (`base_model`,
`model-index` from EvalResult), not a hand-written YAML dialect."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from app.models import Anchor, Chain, Model
from app.services.sources import HF_ID, is_local
from cbd_engine.spec.export import ONNX_ARCHITECTURES
from cbd_engine.spec.families import ModelSpec, read_config
from cbd_engine.spec.shapes import format_size

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A {{ params_text }}-parameter model of the {{ family }} family, made by the CBD model factory from chain
`{{ chain }}` (source `{{ source }}`) by {{ how }}. No training after materialization unless healed.

| | |
|---|---|
| parameters | {{ params }} |
| shape | {{ shape }} |
| alpha (weight of the smaller anchor) | {{ alphas }} |
| mix / init / dtype | {{ mix }} / {{ init }} / {{ dtype }} |
| anchors | {{ anchors }} |
| path between the anchors | {{ path }} |

Parameters by tensor group: {{ groups }}.

Quality on the chain's dev rows when it was made (lower is better): {{ quality }}. The factory measures the
validation loss after publishing; `GET /models/{{ model_id }}` has it, with greedy answers to fixed prompts.

## Use

```python
from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = snapshot_download("cbd/{{ model_id }}", endpoint="http://FACTORY:8000")  # token=... when auth is on
model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
```

llama.cpp, ollama, LM Studio: `POST /models/{{ model_id }}/exports {"quant": "Q8_0"}`, then
`MODEL_ENDPOINT=http://FACTORY:8000/ llama-cli -hf cbd/{{ model_id }}-GGUF:Q8_0`.
{% if onnx %}
ONNX Runtime (onnxruntime-genai, CPU): `POST /models/{{ model_id }}/exports {"format": "onnx", "precision": "int4"}`
(or `fp32`), then

```python
import json

import onnxruntime_genai as og
from huggingface_hub import snapshot_download

folder = snapshot_download("cbd/{{ model_id }}-ONNX", allow_patterns="int4/*", endpoint="http://FACTORY:8000")
model = og.Model(f"{folder}/int4")
tokenizer = og.Tokenizer(model)
prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": "Hello!"}]), add_generation_prompt=True)
params = og.GeneratorParams(model)
params.set_search_options(max_length=256)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode(prompt))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```
{% endif %}"""


def _groups(folder: Path) -> str:
    """Parameter counts by the engine's tensor groups (the ones alpha is chosen for: attention, mlp,
    embeddings_norms), from the model's config."""
    import math

    from cbd_engine.materialization.mixing import tensor_group

    spec = ModelSpec.from_config(read_config(folder))
    arch, counts = spec.architecture, {}
    for _, tensor_spec, _ in arch.tensor_names(spec.shape):
        group = tensor_group(arch, tensor_spec)
        counts[group] = counts.get(group, 0) + math.prod(arch.tensor_shape(tensor_spec, spec.shape))
    return ", ".join(f"{group} {count:,}" for group, count in sorted(counts.items()))


def _license(anchor_dir: Path) -> str:
    """The source's license, as the larger anchor's own card (copied from the source) states it; else "other"."""
    readme = anchor_dir / "README.md"
    if readme.is_file():
        license_ = ModelCard.load(readme, ignore_metadata_errors=True).data.license
        if license_:
            return license_
    return "other"


def model_card(model: Model, chain: Chain, small: Anchor, large: Anchor, large_dir: Path, folder: Path,
               provenance: dict, metrics: dict) -> str:
    """The card's text for the model materialized into `folder`."""
    hub_source = not is_local(chain.source) and HF_ID.match(chain.source)
    alphas = provenance.get("alphas") or provenance.get("alpha")
    mixed = provenance.get("alpha") not in (None, 0.0, 1.0)
    results = [EvalResult(task_type="text-generation", dataset_type="cbd-dev-rows", dataset_name="chain dev rows",
                          metric_type="loss", metric_name=f"dev loss ({name})", metric_value=round(value, 4))
               for name, value in (("this model", metrics.get("dev_loss")),
                                   ("alpha 0: the larger anchor pruned to this size", metrics.get("alpha_0_dev_loss")))
               if value is not None]
    data = ModelCardData(
        model_name=f"cbd/{model.id}", license=_license(large_dir), library_name="transformers",
        pipeline_tag="text-generation", tags=["cbd", "chain-based-distillation", f"init-{model.init}", model.dtype],
        base_model=chain.source if hub_source else None, base_model_relation="merge" if hub_source and mixed else None,
        eval_results=results or None)
    quality = ", ".join(f"{r.metric_name}: {r.metric_value}" for r in results) or "not measured"
    how = (f"the `{model.init}` baseline" if model.init != "cbd" else
           f"mixing its anchors {small.id} and {large.id}" if mixed else
           f"{'expanding the smaller' if provenance.get('alpha') == 1.0 else 'pruning the larger'} anchor")
    trained = provenance.get("interpolation_training")
    path = _trained_path(trained, model.mix)
    card = ModelCard.from_template(
        data, template_str=TEMPLATE, model_id=model.id, chain=chain.id, source=chain.source,
        model_name=f"cbd/{model.id}", family=provenance.get("family", ""), how=how, params=f"{model.params:,}",
        params_text=format_size(model.params),
        shape=json.dumps(model.shape), alphas=json.dumps(alphas), mix=model.mix, init=model.init, dtype=model.dtype,
        anchors=f"{small.id} ({small.params:,}), {large.id} ({large.params:,})", groups=_groups(folder),
        quality=quality, path=path,
        onnx=read_config(folder).get("model_type") in ONNX_ARCHITECTURES)  # ONNX: Llama family
    return str(card)


def _trained_path(trained: dict | None, mix: str) -> str:
    """How the path between the anchors was trained (the materializer's `interpolation_training` record)."""
    if not trained:
        return "not trained: the anchors were distilled alone"
    if trained["kind"] == "nested":
        return ("trained as nested widths while the smaller anchor was distilled (the sandwich rule, random width "
                f"weight {trained['weight']}); this model is the larger anchor's first units, a width trained as such")
    return (f"trained while the smaller anchor was distilled ({trained['kind']} training, weight {trained['weight']}, "
            f"{trained['points']} sizes); this model's {mix} mix "
            + ("is the one trained" if trained["matches_mix"] else "is not the one trained (unit)"))
