"""Networks and classifiers: backbones, inference on saved runs, scoring, the SVM search."""
