"""Throwaway plugin distributions, written to a temporary folder that is put on sys.path."""

from __future__ import annotations

import textwrap
from pathlib import Path


def write_distribution(
    site: Path, name: str, version: str, modules: dict[str, str], entry_points: dict[str, str]
) -> None:
    """Lay out an installed distribution: modules plus a ``.dist-info`` with entry points."""
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[worq]\n{lines}")


ROT13_PLUGIN = """
    import codecs
    from worq_core import Serializer, hookimpl
    from worq_core.serializers import JsonSerializer

    class Rot13Serializer(Serializer):
        name = "rot13-json"

        def dumps(self, value):
            return codecs.encode(JsonSerializer().dumps(value).decode(), "rot13").encode()

        def loads(self, data):
            return JsonSerializer().loads(codecs.decode(data.decode(), "rot13").encode())

    @hookimpl
    def worq_register_serializers():
        return [Rot13Serializer]
"""
