import torch

from model_zoo import create_model
from model_zoo.export import ComposedClassifier, FeatureExtractor, export_onnx, verify_onnx


def _calibrated(model, inputs):
    """Populate BatchNorm running statistics, as any trained model has them (keeps activations O(1))."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(inputs)
    return model.eval()


def test_extractor_and_composed_model_match_onnxruntime(tmp_path):
    torch.manual_seed(0)
    edge = create_model("resnet8_gkt", in_channels=1)
    server = create_model("resnet55_server", zero_init_residual=False)
    _calibrated(ComposedClassifier(edge, server), torch.randn(64, 1, 28, 28))
    example = torch.randn(2, 1, 28, 28)
    extractor = FeatureExtractor(edge)
    path = export_onnx(extractor, example, tmp_path / "extractor.onnx")
    assert verify_onnx(extractor, path, torch.randn(5, 1, 28, 28)) <= 1e-4  # dynamic batch
    composed = ComposedClassifier(edge, server)
    path = export_onnx(composed, example, tmp_path / "composed.onnx")
    assert verify_onnx(composed, path, torch.randn(3, 1, 28, 28)) <= 1e-4
