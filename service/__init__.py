"""BentoML service for orthserve artifacts: `bentoml serve service.service:Classifier`."""
