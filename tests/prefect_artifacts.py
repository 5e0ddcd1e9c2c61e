"""Artifacts a test's flow runs left on the configured Prefect server, read as the UI would list them.

Shared by the tests of the DRMI reduction's and the extraction audit's table artifacts.
"""

from __future__ import annotations

from typing import Any


def artifacts_mentioning(*, key: str, text: str) -> list[Any]:
    """The artifacts under ``key`` on the server ``PREFECT_API_URL`` names whose description holds ``text``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return [artifact for artifact in artifacts if text in (artifact.description or "")]
