"""The model card's text: a Jinja template `hub.card` fills from a run folder's facts (kept apart from the code that
gathers them)."""

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A LoRA adapter for {{ base_text }}, trained with [sdlora](https://github.com/sdlora/sdlora).

{% if trigger_words -%}
## Trigger words

Use {{ trigger_words }} in the prompt to call up the adapter.
{%- else -%}
## Trigger words

None: the adapter was trained without a trigger word and applies to every prompt.
{%- endif %}

Recommended weight: **{{ weight }}** (0 = off, 1 = as trained).

## Files

| file | format | loads in |
|---|---|---|
{% for row in files -%}
| `{{ row.name }}` | {{ row.format }} | {{ row.where }} |
{% endfor %}
{% if samples %}
## Samples

{{ sample_caption }}

![samples]({{ samples[-1] }})
{% endif %}
## Use it
{% if base_note %}
{{ base_note }}
{% endif %}
### diffusers

{% if lycoris_type -%}
This is a {{ lycoris_type }} file, which diffusers' `load_lora_weights` does not apply ({{ lycoris_why }}). sdlora
turns it into a plain LoRA by SVD of each layer's update and prints the error per layer; load that file instead:

```bash
sdlora convert {{ primary }} {{ adapter_name }}_lora.safetensors --to lora --error 0.01 --rank 64{{ convert_base }}
```
{%- else -%}
```python
import torch
from diffusers import {{ pipeline_class }}
{%- if base_import %}
{{ base_import }}
{%- endif %}

pipe = {{ pipeline_class }}.from_pretrained({{ base_python }}, torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{{ repo }}", weight_name="{{ primary }}", adapter_name="{{ adapter_name }}")
pipe.set_adapters(["{{ adapter_name }}"], adapter_weights=[{{ weight }}])
image = pipe("{{ example_prompt }}").images[0]
image.save("out.png")
```

Stack it with another adapter: load both with their own `adapter_name`, then
`pipe.set_adapters(["{{ adapter_name }}", "other"], adapter_weights=[{{ weight }}, 0.5])`.
{%- endif %}

### ComfyUI

{% if kohya -%}
Download `{{ kohya }}` into `ComfyUI/models/loras/`
(`hf download {{ repo }} {{ kohya }} --local-dir ComfyUI/models/loras`), then put a **LoraLoader** node between the
checkpoint loader and the sampler:

```json
{"class_type": "LoraLoader", "inputs": {"lora_name": "{{ kohya }}", "strength_model": {{ weight }}, "strength_clip": {{ weight }}, "model": ["4", 0], "clip": ["4", 1]}}
```
{%- else -%}
ComfyUI reads kohya-format files; this repository holds only the diffusers file `{{ primary }}`, whose key names
ComfyUI does not match. Export a kohya-format copy with sdlora and use that in a **LoraLoader** node at strength
{{ weight }}.
{%- endif %}

### AUTOMATIC1111 / Forge

{% if kohya -%}
Download `{{ kohya }}` into `stable-diffusion-webui/models/Lora/` and write in the prompt:

```text
<lora:{{ kohya_stem }}:{{ weight }}> {{ example_prompt }}
```
{%- else -%}
AUTOMATIC1111 reads kohya-format files; this repository holds only the diffusers file `{{ primary }}`. Export a
kohya-format copy with sdlora, put it in `models/Lora/` and prompt `<lora:NAME:{{ weight }}>`.
{%- endif %}

### sdlora

```bash
sdlora generate --base {{ base_cli }} --lora {{ repo }}:{{ primary }}:{{ weight }} --prompt "{{ example_prompt }}"
```

## Training

| setting | value |
|---|---|
{% for key, value in settings -%}
| {{ key }} | {{ value }} |
{% endfor %}
The full configuration is in [`config.yaml`](config.yaml).
"""
