"""The bench's SD3 / SD3.5 shapes have the published models' parameter counts (built on the meta device)."""

from __future__ import annotations

from sdlora.bench import archs


def test_sd35_large_and_medium_have_their_published_sizes():
    large, medium = archs.sd3_shapes("sd3.5-large"), archs.sd3_shapes("sd3.5-medium")
    # Exact counts of diffusers' SD3Transformer2DModel with the hub configs; with the stored position table they
    # are Stability's "8.1 B" (Large) and "2.5 B" (Medium, MMDiT-X).
    assert large["transformer"] == 8_056_627_520
    assert medium["transformer"] == 2_243_171_520
    assert round((large["transformer"] + large["transformer_pos_embed"]) / 1e9, 1) == 8.1
    assert round((medium["transformer"] + medium["transformer_pos_embed"]) / 1e9, 1) == 2.5
    # The encoders both share: CLIP-L (123.7 M), OpenCLIP-bigG (694.7 M), T5-XXL's encoder (4.76 B); the VAE.
    for shapes in (large, medium):
        assert shapes["text_encoder"] == 123_650_304
        assert shapes["text_encoder_2"] == 694_659_840
        assert shapes["text_encoder_3"] == 4_762_310_656
        assert shapes["vae"] == 83_819_683
    # A rank-16 LoRA on the joint attention: what training keeps in fp32 with its optimizer state.
    assert medium["lora_rank16"] == 11_943_936 and large["lora_rank16"] == 23_580_672
