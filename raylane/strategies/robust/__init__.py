"""Byzantine-robust training: the strategy (strategy.py). Its rules, one round's aggregation with the
rows' preconditions, and the attacks are blocks (raylane.strategies.blocks): any sync path may use them."""
