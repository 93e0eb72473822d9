"""Global models: image datasets, backbones, training, prediction, ensembling, embeddings."""
