"""One trial: its context, its body (train, measure, export), the pre-flight and the recipe it leaves."""
