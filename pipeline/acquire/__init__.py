"""Getting a competition onto disk: Kaggle download, image URLs, archives, cleaning, the competition folder, synthetic data."""
