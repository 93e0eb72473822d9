"""Local-feature verification: extraction, the feature cache, matching with RANSAC, the inliers table."""
