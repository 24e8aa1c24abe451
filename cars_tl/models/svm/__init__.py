"""The SVM (model C): kernels, the fitted model and its file, and the cross-validated search."""
