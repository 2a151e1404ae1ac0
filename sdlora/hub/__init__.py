"""Sharing on the Hugging Face Hub: uploads and downloads (`transfer.py`) and the model card (`card.py`).

The package's public names are re-exported here."""

from sdlora.hub.transfer import (  # noqa: F401
    PREFERRED_ADAPTER,
    CheckpointPusher,
    HubError,
    UploadPlan,
    parse_hub_source,
    plan_upload,
    push,
    push_folder,
    resolve_adapter,
)
