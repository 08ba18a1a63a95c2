"""SFT data: chat corpora -> token examples with an assistant-only loss mask -> packed or padded rows."""
