"""MMPretrain / mmengine adapter: registered model, exit neck, head, hooks and metric."""
