"""The train stage: light heads fitted on cached features, never on a model.

Modules
-------
probes
    Per-layer standardised logistic-regression probes and their safe persistence.
fusion
    :class:`~stages.train.fusion.FusionHead`, an LLMEmbed-style fused multi-block head.
concat
    :class:`~stages.train.concat.ConcatHead`, the concatenate-and-probe baseline.
plots
    Probe accuracy and ``nu`` per layer.

Imports are left to the modules so that importing the package stays cheap
(``fusion`` pulls in torch).
"""
