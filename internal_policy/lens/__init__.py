"""The lens: residual states -> policies -> entropies.

``states`` reads the residual stream (TransformerLens hooks for analysis, plain decoder hooks with an early stop
for training), ``policy`` turns a state into a policy with the model's own unembedding, ``engine`` streams the
entropies of every layer and module, ``refinement`` compares a layer with the ones above it.
"""
