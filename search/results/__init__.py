"""What a search leaves: the record, ranking and Pareto maths, reports, tracking and the model registry."""
