"""An out-of-tree secondary tier and an out-of-tree offloading spec, loaded the
way vLLM loads them:

  "secondary_tiers": [{"type": "DictTier", "module_path": "dict_tier"}]
  "spec_name": "CountingSpec", "spec_module_path": "dict_tier"
"""
from typing import Literal

from kvtier.connectors.offloading.specs import OffloadingSpec
from kvtier.kvstore.tiers import BlobBackend, BlobTier, TierSpec

OBJECTS: dict[str, bytes] = {}  # one per process: every engine of it shares the tier


class DictBackend(BlobBackend):
    def write(self, names, parts):
        for name, chunks in zip(names, parts):
            OBJECTS[name] = b"".join(bytes(memoryview(chunk).cast("B")) for chunk in chunks)
        return [None] * len(names)

    def read(self, names, sink):
        import io
        for i, name in enumerate(names):
            if name in OBJECTS:
                sink(i, io.BytesIO(OBJECTS[name]), len(OBJECTS[name]))

    def exists(self, names):
        n = 0
        while n < len(names) and names[n] in OBJECTS:
            n += 1
        return n

    def delete(self, names):
        for name in names:
            OBJECTS.pop(name, None)


class DictTier(TierSpec):
    type: Literal["DictTier"] = "DictTier"

    def build(self, ctx):
        return BlobTier(self.name or "dict", "dict", DictBackend(), ctx.codec, health=self.health())


class CountingSpec(OffloadingSpec):
    built = 0

    def build_store(self, *args, **kwargs):
        CountingSpec.built += 1
        return super().build_store(*args, **kwargs)
