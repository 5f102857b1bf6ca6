//! `shoal image …`: this node's images, in its containerd.

use std::path::PathBuf;

use clap::Subcommand;

use super::Client;
use super::output::{Format, print_table};
use crate::api::Request;
use crate::views::ImageView;

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Load the images of an OCI image archive (a tar) into this node.
    Load {
        /// The archive.
        file: PathBuf,
    },
    /// Pull an image from its registry into this node.
    Pull {
        /// NAME[:TAG] or NAME@sha256:DIGEST.
        image: String,
    },
    /// Remove images from this node.
    Rm {
        /// Their names.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// List this node's images.
    Ls {
        /// Output format: `table` or `json`.
        #[arg(long, default_value = "table")]
        format: Format,
        /// Print names only.
        #[arg(short, long)]
        quiet: bool,
    },
}

impl ImageCmd {
    pub async fn exec(self, client: &Client) -> anyhow::Result<()> {
        match self {
            ImageCmd::Load { file } => {
                // The daemon reads the file: it gets the path as seen from here.
                let path = std::path::absolute(&file)?;
                let loaded: Vec<ImageView> = client.call_as(&Request::ImageLoad { path }).await?;
                for i in loaded {
                    println!("Loaded image: {} ({})", i.name, i.digest);
                }
            }
            ImageCmd::Pull { image } => {
                let pulled: Vec<ImageView> = client.call_as(&Request::ImagePull { image }).await?;
                for i in pulled {
                    println!("Pulled image: {} ({})", i.name, i.digest);
                }
            }
            ImageCmd::Rm { images } => {
                let (removed, failed) = client
                    .call_each::<serde_json::Value>(images, |image| Request::ImageRm { image })
                    .await;
                removed
                    .iter()
                    .for_each(|v| println!("Untagged: {}", v["removed"].as_str().unwrap_or("")));
                super::check_failures(failed, "image(s) not removed")?;
            }
            ImageCmd::Ls { format, quiet } => {
                let images: Vec<ImageView> = client.call_as(&Request::ImageLs).await?;
                if quiet {
                    images.iter().for_each(|i| println!("{}", i.name));
                } else if format == Format::Json {
                    println!("{}", serde_json::to_string_pretty(&images)?);
                } else {
                    let rows: Vec<Vec<String>> = images
                        .iter()
                        .map(|i| vec![i.name.clone(), i.digest.clone()])
                        .collect();
                    print_table(&["NAME", "DIGEST"], &rows);
                }
            }
        }
        Ok(())
    }
}
