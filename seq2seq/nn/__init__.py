"""The paper's model: the Transformer, its typed decoding cache and its loss. Imports only the top level."""
