"""Usage ledgers, the span processor that charges them, and the budget checks."""
