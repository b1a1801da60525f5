"""The online wing: the OpenAI-compatible server, the interaction and feedback store, drift
statistics, and the names of the events and deployments that retrain on them."""
