"""A tiny `trust_remote_code` model: its code lives in these files, which a saved folder must carry."""
