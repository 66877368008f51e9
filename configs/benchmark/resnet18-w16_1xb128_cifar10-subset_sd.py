# Benchmark arm "self-distillation": the plain arm's config, unchanged but for the model type (exits after
# stages 1-3, BYOT's defaults: T = 3, alpha = 0.3, lambda = 0.03) and the per-exit metric.
_base_ = ['./resnet18-w16_1xb128_cifar10-subset_plain.py']

custom_imports = dict(imports=['sd_plugin'], allow_failed_imports=False)

model = dict(type='SelfDistillClassifier')

val_evaluator = dict(_delete_=True, type='MultiExitAccuracy')
test_evaluator = val_evaluator
