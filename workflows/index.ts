/** The workflow bundle's entry: every exported function is a workflow type (names in common/names.ts). */
export { tokenLifecycle } from './token-lifecycle.js';
export { reconcile } from './reconciler.js';
