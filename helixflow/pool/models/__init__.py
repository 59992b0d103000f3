"""Models served by the inference pool: configs, weight loading, tokenizers and torch modules."""
