"""What measures samples: the demo data (Fashion-MNIST), its classifier, and the metrics (FD, PSNR, accuracy)."""
