"""A minimal out-of-tree KV connector: device blocks kept in a Python dict.

Load it with
  --kv-transfer-config '{"kv_connector": "DictConnector", "kv_role": "kv_both",
                         "kv_connector_module_path": "dict_connector"}'
"""
from kvtier.connectors.base import ConnectorMetadata, KVConnectorBase


class DictConnector(KVConnectorBase):
    def __init__(self, config, layout):
        super().__init__(config, layout)
        self.blocks = {}   # (group, block hash) -> one page of KV
        self.loads = []    # (device block id, stored page) to copy before the next forward

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        bs = self.layout.block_size
        n = num_computed_tokens // bs
        while n < len(request.block_hashes) and all(
                (g.index, request.block_hashes[n]) in self.blocks for g in self.layout.groups):
            n += 1
        return max(0, n * bs - num_computed_tokens), False  # False: loaded in this very step

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        bs = self.layout.block_size
        first = request.num_computed_tokens // bs
        for i in range(first, first + num_external_tokens // bs):
            for g in self.layout.groups:
                self.loads.append((block_ids[g.index][i], self.blocks[(g.index, request.block_hashes[i])]))

    def build_connector_meta(self, plan):
        meta = ConnectorMetadata()
        meta.loads, self.loads = self.loads, []
        meta.plan = plan
        return meta

    def start_load_kv(self, meta):
        for block_id, page in meta.loads:
            self.kv_cache[block_id].copy_(page)

    def wait_for_save(self, meta):
        bs = self.layout.block_size
        for s in meta.plan.scheduled:
            full = (s.num_computed_tokens + s.num_new_tokens) // bs
            for i in range(s.num_computed_tokens // bs, min(full, len(s.request.block_hashes))):
                for g in self.layout.groups:
                    self.blocks[(g.index, s.request.block_hashes[i])] = self.kv_cache[s.block_ids[g.index][i]].clone()

    def get_finished(self, finished_req_ids):
        return set(), set()
