"""Tensor-parallel inference: transformer blocks split across devices (issue 6).

``split`` cuts a layer by device speed, ``llama`` / ``bert`` are the member programs,
``collective`` joins members over the agent's gloo data plane, ``store`` / ``window`` hold a
member's weights (all resident or a sliding window), ``runner`` runs a whole group on one
machine and ``deploy`` is the agent's side. See docs/tp.md.
"""
