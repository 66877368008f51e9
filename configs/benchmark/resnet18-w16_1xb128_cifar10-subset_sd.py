# Benchmark arm "self-distillation": the plain arm's config, unchanged but for the model type (exits after
# stages 1-3, BYOT's defaults: T = 3, alpha = 0.3, lambda = 0.03) and the per-exit metric.
_base_ = ['./resnet18-w16_1xb128_cifar10-subset_plain.py']


model = dict(type='sd_plugin.SelfDistillClassifier')

val_evaluator = dict(_delete_=True, type='sd_plugin.MultiExitAccuracy')
test_evaluator = val_evaluator
