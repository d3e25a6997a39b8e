/** SQL identifiers. Pure (no imports): the verifier's entry point loads it without the store's modules. */
export function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}
